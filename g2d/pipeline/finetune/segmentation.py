"""Segmentation (SIIM pneumothorax, RSNA opacity) by MGCA's protocol: the U-Net's decoder trained on the frozen
encoder's maps (or the whole U-Net, encoder unfrozen) with 10 x focal - log(soft Dice), on augmented train images
(shift / scale / rotate), scored by Dice per image at `threshold` (an empty truth scores 1 only for an empty
prediction), with Dice on images with a finding, the share of empty images left empty and the pooled foreground
Dice beside it."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from g2d.config import Finetune
from g2d.data import augment
from g2d.data.labelled import LabelledSplit
from g2d.data.tasks import TaskSpec
from g2d.model.losses import SegmentationLoss
from g2d.model.transfer import SegmentationNet
from g2d.pipeline.downstream_metrics import dice_per_image, segmentation_scores
from g2d.pipeline.finetune import features
from g2d.pipeline.finetune import fit as loop


def wrap(unet: nn.Module, spec: TaskSpec, cfg: Finetune, config: dict) -> nn.Module:
    seg = cfg.segmentation
    config.update(classes=list(spec.labels), freeze_encoder=seg.freeze_encoder, transfer=seg.transfer,
                  head=seg.head if uses_decoder(cfg) else "fresh", threshold=seg.threshold)
    net = rewrap(unet, config)
    if config["head"] == "fresh":  # start from "no finding" everywhere
        head = net.unet.segmentation_head
        if uses_decoder(cfg):  # the pre-training head predicts the pseudo mask, ~15% of every body
            from segmentation_models_pytorch.base.initialization import initialize_head

            initialize_head(head)
        nn.init.constant_(head[0].bias, -math.log((1 - seg.prior) / seg.prior))
    return net


def rewrap(unet: nn.Module, config: dict) -> nn.Module:
    return SegmentationNet(unet, config["freeze_encoder"])


def uses_decoder(cfg: Finetune) -> bool:
    return cfg.segmentation.transfer == "encoder_decoder"


def views(train: LabelledSplit, cfg: Finetune, seed: int) -> list[LabelledSplit]:
    """The train split and its `augment.views` transformed copies (none when augmentation is fresh or off)."""
    aug = cfg.segmentation.augment
    if not aug.views or aug.p == 0:
        return [train]
    copies = augment.views(aug, train.images.cpu(), train.masks.cpu(), train.ids, seed)
    return [train, *(LabelledSplit(train.split, train.ids, im.to(train.images.device), mk.to(train.masks.device))
                     for im, mk in copies)]


def fit(net: SegmentationNet, inputs: features.Inputs, rows: torch.Tensor, spec: TaskSpec, cfg: Finetune,
        seed: int, advance, log, setup: loop.Setup = loop.SINGLE, epoch_rows: int = 0) -> loop.FitResult:
    """Train on the rows `rows` of the train split, an epoch covering at least `epoch_rows` (loop.epoch_rows).
    `inputs.val` is needed on rank 0 only."""
    seg = cfg.segmentation
    loss_fn = SegmentationLoss(seg.focal_weight, seg.focal_gamma)
    trained = setup.wrap(features.Head(net, encodes=inputs.maps is None))
    train = inputs.views[0]
    fresh = augment.Fresh(seg.augment, train.images.shape[-1], seed + setup.ctx.rank) \
        if seg.augment.views is None and seg.augment.p > 0 else None
    n_views = len(inputs.views) - 1

    def step_loss(mine: torch.Tensor, epoch: int) -> torch.Tensor:
        at = rows[mine]  # rows of the whole train split
        if fresh is not None:
            images, masks = fresh(train.images[at], train.masks[at])
            with torch.no_grad():
                x = images if inputs.maps is None else net.encode(images)  # a frozen encoder: no graph
        else:
            view = features.view_choice(len(train), n_views, seg.augment.p, seed, epoch)[at]
            [masks] = features.gather([lambda r, s=s: [s.masks[r]] for s in inputs.views], view, at)
            if inputs.maps is not None:  # the frozen encoder's cached (or per-batch) maps of each row's view
                x = features.gather(inputs.maps, view, at)
            else:  # the encoder trains: the images themselves
                [x] = features.gather([lambda r, s=s: [s.images[r]] for s in inputs.views], view, at)
        return loss_fn(trained(_layout(x, setup)), masks)

    def validate() -> dict[str, float]:
        logits = _logits(net, inputs.val, inputs.val_maps, setup)
        loss = float(loss_fn(logits, inputs.val.masks))
        return {"loss": loss, "score": segmentation_scores(torch.sigmoid(logits), inputs.val.masks,
                                                           seg.threshold)["dice"]}

    return loop.fit(net, len(rows), seg, seed, step_loss, validate, advance, log, setup, epoch_rows)


def _layout(x, setup: loop.Setup):
    return setup.images(x) if isinstance(x, torch.Tensor) else [setup.images(m) for m in x]


@torch.no_grad()
def _logits(net: nn.Module, split: LabelledSplit, maps: features.Encoded | None = None,
            setup: loop.Setup = loop.SINGLE, size: int = 64) -> torch.Tensor:
    """Logits of a whole split, from its cached maps when given (the same numbers as the network's forward)."""
    net.eval()
    out = []
    for i in range(0, len(split), size):
        rows = torch.arange(i, min(i + size, len(split)))
        x = maps(rows) if maps is not None else split.images[rows]
        out.append((net.decode(_layout(x, setup)) if maps is not None else net(_layout(x, setup))).float())
    return torch.cat(out)


def probabilities(net: nn.Module, split: LabelledSplit, maps: features.Encoded | None = None) -> torch.Tensor:
    return torch.sigmoid(_logits(net, split, maps))


@torch.no_grad()
def evaluate(net: nn.Module, split: LabelledSplit, spec: TaskSpec, config: dict,
             maps: features.Encoded | None = None) -> dict:
    """The test scores, and each image's Dice (`per_image_dice`, in split order) for paired comparisons."""
    probs = probabilities(net, split, maps)
    dice = dice_per_image(probs > config["threshold"], split.masks)
    return {**segmentation_scores(probs, split.masks, config["threshold"]),
            "per_image_dice": [round(float(d), 6) for d in dice]}


def figure(net: nn.Module, split: LabelledSplit, spec: TaskSpec, config: dict, n: int, title: str,
           path: Path) -> Path:
    from g2d.pipeline.figures import segmentation_grid

    rows = _examples(split, n)
    probs = probabilities(net, split.subset([split.ids[i] for i in rows]))
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
