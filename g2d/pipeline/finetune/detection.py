"""Detection (RSNA opacity, Object-CXR): RetinaNet through an FPN on the (frozen) encoder, trained by epochs with
torchvision's focal + box losses on the encoder's cached maps, scored by mAP over IoU 0.4:0.05:0.75. Early
stopping and the kept weights follow the val mAP (MGCA's YOLOv3 protocol)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from g2d.config import Finetune
from g2d.data.labelled import LabelledSplit
from g2d.data.tasks import TaskSpec
from g2d.model.transfer import build_detector
from g2d.pipeline.downstream_metrics import mean_ap
from g2d.pipeline.finetune import features
from g2d.pipeline.finetune import fit as loop


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


def views(train: LabelledSplit, cfg: Finetune, seed: int) -> list[LabelledSplit]:
    return [train]  # MGCA's detection protocol has no augmentation


def _targets(split: LabelledSplit, idx: list[int]) -> list[dict]:
    return [{"boxes": split.boxes[i], "labels": split.box_labels[i]} for i in idx]


def fit(net: nn.Module, inputs: features.Inputs, rows: torch.Tensor, spec: TaskSpec, cfg: Finetune, seed: int,
        advance, log, setup: loop.Setup = loop.SINGLE, epoch_rows: int = 0) -> loop.FitResult:
    """Train on the rows `rows` of the train split, an epoch covering at least `epoch_rows` (loop.epoch_rows).
    `inputs.val` is needed on rank 0 only."""
    train = inputs.views[0]
    # every trainable parameter is reached every step: a share without any box still runs the box-regression
    # loss (over no anchors: a zero gradient, not none), checked with 2 ranks on shares of 2 images
    trained = setup.wrap(features.Head(net, encodes=inputs.maps is None))

    def step_loss(mine: torch.Tensor, epoch: int) -> torch.Tensor:
        at = rows[mine]
        x = inputs.maps[0](at) if inputs.maps is not None else setup.images(train.images[at])
        return sum(trained(x, _targets(train, at.tolist())).values())

    def validate() -> dict[str, float]:
        val, loss, found = inputs.val, 0.0, []
        for rows in torch.arange(len(val)).split(64):  # one pass gives the val loss and the detections
            losses, detections = net.decode_both(_maps(net, val, inputs.val_maps, rows), _targets(val, rows.tolist()))
            loss += float(sum(losses.values())) * len(rows)
            found += [_classes_only(p) for p in detections]
        return {"loss": loss / len(val), "score": mean_ap(found, val.boxes, val.box_labels, spec.labels,
                                                           cfg.detection.detections_per_image)["map"]}

    return loop.fit(net, len(rows), cfg.detection, seed, step_loss, validate, advance, log, setup, epoch_rows)


def _maps(net: nn.Module, split: LabelledSplit, maps: features.Encoded | None, rows: torch.Tensor):
    return maps(rows) if maps is not None else net.encode(split.images[rows])


@torch.no_grad()
def predict(net: nn.Module, split: LabelledSplit, maps: features.Encoded | None = None, size: int = 32) -> list[dict]:
    net.eval()
    out: list[dict] = []
    for rows in torch.arange(len(split)).split(size):
        out += [_classes_only(p) for p in net.decode(_maps(net, split, maps, rows))]
    return out


def _classes_only(detections: dict) -> dict:
    keep = detections["labels"] > 0  # index 0 is torchvision's background, never a class
    return {k: v[keep] for k, v in detections.items()}


def evaluate(net: nn.Module, split: LabelledSplit, spec: TaskSpec, config: dict,
             maps: features.Encoded | None = None) -> dict:
    return mean_ap(predict(net, split, maps), split.boxes, split.box_labels, spec.labels,
                   config["detections_per_image"])


def figure(net: nn.Module, split: LabelledSplit, spec: TaskSpec, config: dict, n: int, title: str,
           path: Path) -> Path:
    from g2d.pipeline.figures import detection_grid

    with_boxes = [i for i in range(len(split)) if len(split.boxes[i])]
    rows = (with_boxes + [i for i in range(len(split)) if i not in set(with_boxes)])[:n]
    sub = split.subset([split.ids[i] for i in rows])
    return detection_grid(sub.images, sub.boxes, predict(net, sub), sub.ids, title, path)
