"""Linear probe (CheXpert, RSNA, COVIDx): the frozen encoder's pooled features are computed once, a
linear layer is trained on them (BCE per label; cross-entropy for one-of-K), scored by macro AUC or
accuracy. Uncertain and missing labels (NaN) are left out of loss and metrics."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from g2d.config import Finetune
from g2d.data.labelled import LabelledSplit
from g2d.data.tasks import TaskSpec
from g2d.model.transfer import LinearProbe
from g2d.pipeline.downstream import fit as loop
from g2d.pipeline.downstream_metrics import accuracy_scores, auc_scores


def wrap(unet: nn.Module, spec: TaskSpec, cfg: Finetune, config: dict) -> nn.Module:
    config.update(classes=list(spec.labels), multiclass=spec.multiclass)
    return rewrap(unet, config)


def rewrap(unet: nn.Module, config: dict) -> nn.Module:
    return LinearProbe(unet.encoder, len(config["classes"]))


def uses_decoder(cfg: Finetune) -> bool:
    return False


def _loss(logits: torch.Tensor, labels: torch.Tensor, multiclass: bool) -> torch.Tensor:
    if multiclass:
        return F.cross_entropy(logits, labels.argmax(1))
    known = ~torch.isnan(labels)
    return F.binary_cross_entropy_with_logits(logits[known], labels[known])


def scores(logits: torch.Tensor, labels: torch.Tensor, spec: TaskSpec) -> dict:
    if spec.multiclass:
        return accuracy_scores(logits, labels, spec.labels)
    return auc_scores(torch.sigmoid(logits), labels, spec.labels)


def fit(net: LinearProbe, data: dict[str, LabelledSplit], spec: TaskSpec, cfg: Finetune, seed: int,
        advance, log, setup: loop.Setup = loop.SINGLE) -> loop.FitResult:
    """`data["val"]` is needed on rank 0 only (the rank that validates)."""
    train, val = data["train"], data.get("val")
    # the frozen encoder's features, once: each rank computes its share of the rows and all get them all
    features = loop.on_shares(net.features, train.images, setup.ctx)
    if len(train) > 1:  # one image has no spread to standardise by
        net.set_standardisation(features)
    standardised = (features - net.mean) / net.std  # what `classify` feeds the head, row by row
    head = setup.wrap(net.head)  # the only trainable part
    val_features = loop.in_batches(net.features, val.images) if val is not None else None

    def step_loss(idx: torch.Tensor) -> torch.Tensor:
        return _loss(head(standardised[idx]), train.labels[idx], spec.multiclass)

    def validate() -> float:
        return scores(net.classify(val_features), val.labels, spec)[spec.metric]

    return loop.fit(net, len(train), cfg.probe, seed, step_loss, validate, advance, log, setup)


def evaluate(net: nn.Module, split: LabelledSplit, spec: TaskSpec, config: dict) -> dict:
    return scores(loop.in_batches(net, split.images), split.labels, spec)


def figure(net: nn.Module, split: LabelledSplit, spec: TaskSpec, config: dict, n: int, title: str,
           path: Path) -> Path:
    from g2d.pipeline.figures import labelled_grid

    rows = list(range(min(n, len(split))))
    logits = loop.in_batches(net, split.images[rows])
    probs = torch.softmax(logits, 1) if spec.multiclass else torch.sigmoid(logits)
    captions = []
    for r, p in zip(rows, probs, strict=True):
        truth = [c for c, v in zip(spec.labels, split.labels[r].tolist(), strict=True) if v == 1] or ["none"]
        top = sorted(zip(p.tolist(), spec.labels, strict=True), reverse=True)[:2]
        captions.append("truth: " + ", ".join(truth) + "\n" + ", ".join(f"{c} {v:.2f}" for v, c in top))
    return labelled_grid(split.images[rows], [split.ids[i] for i in rows], captions, title, path)
