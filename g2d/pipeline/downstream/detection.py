"""Detection (RSNA opacity, Object-CXR): RetinaNet on the (frozen) encoder through an FPN, trained with
torchvision's focal + box losses, scored by mAP over IoU 0.4:0.05:0.75."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from g2d.config import Finetune
from g2d.data.labelled import LabelledSplit
from g2d.data.tasks import TaskSpec
from g2d.model.transfer import build_detector
from g2d.pipeline.downstream import fit as loop
from g2d.pipeline.downstream_metrics import mean_ap


def wrap(unet: nn.Module, spec: TaskSpec, cfg: Finetune, config: dict) -> nn.Module:
    d = cfg.detection
    config.update(classes=list(spec.labels), freeze_encoder=d.freeze_encoder, fpn_channels=d.fpn_channels,
                  score_threshold=d.score_threshold, detections_per_image=d.detections_per_image)
    return rewrap(unet, config)


def rewrap(unet: nn.Module, config: dict) -> nn.Module:
    return build_detector(unet.encoder, len(config["classes"]), config["image_size"], config["fpn_channels"],
                          config["freeze_encoder"], config["score_threshold"], config["detections_per_image"])


def uses_decoder(cfg: Finetune) -> bool:
    return False


def _targets(split: LabelledSplit, idx: list[int]) -> list[dict]:
    return [{"boxes": split.boxes[i], "labels": split.box_labels[i]} for i in idx]


def fit(net: nn.Module, data: dict[str, LabelledSplit], spec: TaskSpec, cfg: Finetune, seed: int,
        advance, log, setup: loop.Setup = loop.SINGLE) -> loop.FitResult:
    """`data["val"]` is needed on rank 0 only (the rank that validates)."""
    train, val = data["train"], data.get("val")
    # every trainable parameter is reached every step: a share without any box still runs the box-regression
    # loss (over no anchors: a zero gradient, not none), checked with 2 ranks on shares of 2 images
    trained = setup.wrap(net)

    def step_loss(idx: torch.Tensor) -> torch.Tensor:
        rows = idx.tolist()
        losses = trained(list(train.images[rows]), _targets(train, rows))
        return sum(losses.values())

    def validate() -> float:
        return evaluate(net, val, spec, {"detections_per_image": cfg.detection.detections_per_image})["map"]

    return loop.fit(net, len(train), cfg.detection, seed, step_loss, validate, advance, log, setup)


@torch.no_grad()
def predict(net: nn.Module, split: LabelledSplit, size: int = 32) -> list[dict]:
    net.eval()
    out: list[dict] = []
    for i in range(0, len(split), size):
        for p in net(list(split.images[i:i + size])):
            keep = p["labels"] > 0  # index 0 is torchvision's background, never a class
            out.append({k: v[keep] for k, v in p.items()})
    return out


def evaluate(net: nn.Module, split: LabelledSplit, spec: TaskSpec, config: dict) -> dict:
    return mean_ap(predict(net, split), split.boxes, split.box_labels, spec.labels, config["detections_per_image"])


def figure(net: nn.Module, split: LabelledSplit, spec: TaskSpec, config: dict, n: int, title: str,
           path: Path) -> Path:
    from g2d.pipeline.figures import detection_grid

    with_boxes = [i for i in range(len(split)) if len(split.boxes[i])]
    rows = (with_boxes + [i for i in range(len(split)) if i not in set(with_boxes)])[:n]
    sub = LabelledSplit(split.split, [split.ids[i] for i in rows], split.images[rows],
                        boxes=[split.boxes[i] for i in rows], box_labels=[split.box_labels[i] for i in rows])
    return detection_grid(sub.images, sub.boxes, predict(net, sub), sub.ids, title, path)
