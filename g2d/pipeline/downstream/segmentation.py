"""Segmentation (SIIM pneumothorax, RSNA opacity): the U-Net with its encoder frozen or fine-tuned,
trained with 1/2 (Dice + BCE), scored by Dice per image at `threshold`."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from g2d.config import Finetune
from g2d.data.labelled import LabelledSplit
from g2d.data.tasks import TaskSpec
from g2d.model.losses import DenseLoss
from g2d.model.transfer import SegmentationNet
from g2d.pipeline.downstream import fit as loop
from g2d.pipeline.downstream_metrics import segmentation_scores


def wrap(unet: nn.Module, spec: TaskSpec, cfg: Finetune, config: dict) -> nn.Module:
    config.update(classes=list(spec.labels), freeze_encoder=cfg.segmentation.freeze_encoder,
                  transfer=cfg.segmentation.transfer, threshold=cfg.segmentation.threshold)
    net = rewrap(unet, config)
    if not uses_decoder(cfg):  # a fresh head: start from "no finding" everywhere
        prior = cfg.segmentation.prior
        nn.init.constant_(net.unet.segmentation_head[0].bias, -math.log((1 - prior) / prior))
    return net


def rewrap(unet: nn.Module, config: dict) -> nn.Module:
    return SegmentationNet(unet, config["freeze_encoder"])


def uses_decoder(cfg: Finetune) -> bool:
    return cfg.segmentation.transfer == "encoder_decoder"


def fit(net: SegmentationNet, data: dict[str, LabelledSplit], spec: TaskSpec, cfg: Finetune, seed: int,
        advance, log, setup: loop.Setup = loop.SINGLE) -> loop.FitResult:
    """`data["val"]` is needed on rank 0 only (the rank that validates)."""
    train, val, threshold = data["train"], data.get("val"), cfg.segmentation.threshold
    loss_fn = DenseLoss()
    trained = setup.wrap(net)  # every trainable part gets a gradient every step

    def step_loss(idx: torch.Tensor) -> torch.Tensor:
        return loss_fn(trained(setup.images(train.images[idx])), train.masks[idx])

    def validate() -> float:
        return segmentation_scores(probabilities(net, val), val.masks, threshold)["dice"]

    return loop.fit(net, len(train), cfg.segmentation, seed, step_loss, validate, advance, log, setup)


def probabilities(net: nn.Module, split: LabelledSplit) -> torch.Tensor:
    net.eval()
    return loop.in_batches(lambda x: torch.sigmoid(net(x)), split.images)


def evaluate(net: nn.Module, split: LabelledSplit, spec: TaskSpec, config: dict) -> dict:
    """The test scores, and each image's Dice (`per_image_dice`, in split order) for paired comparisons."""
    from g2d.pipeline.downstream_metrics import dice_per_image, dice_scores

    dice = dice_per_image(probabilities(net, split) > config["threshold"], split.masks)
    return {**dice_scores(dice, split.masks), "per_image_dice": [round(float(d), 6) for d in dice]}


def figure(net: nn.Module, split: LabelledSplit, spec: TaskSpec, config: dict, n: int, title: str,
           path: Path) -> Path:
    from g2d.pipeline.downstream_metrics import dice_per_image
    from g2d.pipeline.figures import segmentation_grid

    rows = _examples(split, n)
    probs = probabilities(net, split)[rows]
    pred = probs > config["threshold"]
    dice = dice_per_image(pred, split.masks[rows])
    return segmentation_grid(split.images[rows], split.masks[rows], pred, [split.ids[i] for i in rows],
                             [f"Dice {d:.2f}" for d in dice.tolist()], title, path)


def _examples(split: LabelledSplit, n: int) -> list[int]:
    """Mostly images with a finding (where there is something to see), some without."""
    positive = split.masks.flatten(1).any(1)
    pos = torch.nonzero(positive).flatten().tolist()
    neg = torch.nonzero(~positive).flatten().tolist()
    n_neg = min(len(neg), max(n // 4, n - len(pos)))
    return sorted((pos[: n - n_neg] + neg[:n_neg])[:n])
