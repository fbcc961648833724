"""Linear probe (CheXpert, RSNA, COVIDx) by MGCA's protocol: one linear layer on the frozen encoder's pooled last
map (computed once per image, g2d/pipeline/finetune/features.py), BCE per label (cross-entropy for one-of-K),
scored by macro AUC or accuracy. Uncertain and missing labels (NaN) are left out of loss and metrics."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from g2d.config import Finetune
from g2d.data.labelled import LabelledSplit
from g2d.data.tasks import TaskSpec
from g2d.model.transfer import LinearProbe
from g2d.pipeline.downstream_metrics import accuracy_scores, auc_scores
from g2d.pipeline.finetune import features
from g2d.pipeline.finetune import fit as loop


def wrap(unet: nn.Module, spec: TaskSpec, cfg: Finetune, config: dict) -> nn.Module:
    config.update(classes=list(spec.labels), multiclass=spec.multiclass)
    return rewrap(unet, config)


def rewrap(unet: nn.Module, config: dict) -> nn.Module:
    return LinearProbe(unet.encoder, len(config["classes"]))


def uses_decoder(cfg: Finetune) -> bool:
    return False


def views(train: LabelledSplit, cfg: Finetune, seed: int) -> list[LabelledSplit]:
    return [train]


def _loss(logits: torch.Tensor, labels: torch.Tensor, multiclass: bool) -> torch.Tensor:
    if multiclass:
        return F.cross_entropy(logits, labels.argmax(1))
    known = ~torch.isnan(labels)
    return F.binary_cross_entropy_with_logits(logits[known], labels[known])


def scores(logits: torch.Tensor, labels: torch.Tensor, spec: TaskSpec) -> dict:
    if spec.multiclass:
        return accuracy_scores(logits, labels, spec.labels)
    return auc_scores(torch.sigmoid(logits), labels, spec.labels)


def fit(net: LinearProbe, inputs: features.Inputs, rows: torch.Tensor, spec: TaskSpec, cfg: Finetune, seed: int,
        advance, log, setup: loop.Setup = loop.SINGLE, epoch_rows: int = 0) -> loop.FitResult:
    """Train on the rows `rows` of the train split, an epoch covering at least `epoch_rows` (loop.epoch_rows).
    `inputs.val` is needed on rank 0 only."""
    train = inputs.views[0]
    [pooled] = inputs.maps[0](rows)  # the frozen encoder's pooled maps of the cell's rows
    if cfg.probe.standardise and len(rows) > 1:  # one image has no spread to standardise by
        net.set_standardisation(pooled)
    labels = train.labels[rows]
    head = setup.wrap(net.head)  # the only trainable part
    standardised = (pooled - net.mean) / net.std  # what `classify` feeds the head, row by row

    def step_loss(mine: torch.Tensor, epoch: int) -> torch.Tensor:
        with torch.autocast(standardised.device.type, enabled=False):  # as `classify`: fp32
            return _loss(head(standardised[mine]), labels[mine], spec.multiclass)

    def validate() -> dict[str, float]:
        logits = net.classify(inputs.val_maps.all()[0])
        return {"loss": float(_loss(logits, inputs.val.labels, spec.multiclass)),
                "score": scores(logits, inputs.val.labels, spec)[spec.metric]}

    return loop.fit(net, len(rows), cfg.probe, seed, step_loss, validate, advance, log, setup, epoch_rows)


@torch.no_grad()
def evaluate(net: nn.Module, split: LabelledSplit, spec: TaskSpec, config: dict,
             maps: features.Encoded | None = None) -> dict:
    logits = net.classify(maps.all()[0]) if maps is not None else loop.in_batches(net, split.images)
    return scores(logits, split.labels, spec)


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
