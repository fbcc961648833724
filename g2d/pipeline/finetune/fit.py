"""The fine-tuning loop shared by every task, MGCA's protocol: at most `epochs` passes over the train set in
seeded order (so the number of steps grows with the data), AdamW at a constant rate, validation after every
epoch, early stopping after `patience` epochs without a better monitored value (the val loss, or the val score),
and the weights of the best epoch restored at the end (test metrics are taken there).

One process, or several under torchrun (`Setup.ctx`, g2d/pipeline/distributed.py). The task's
`batch_size` is the *global* batch: the seeded batches are the same on every rank and rank r trains on
rows idx[r::world] of each, through DDP (gradients averaged over ranks, batch norms over the global
batch), so the number of steps and the result do not depend on the world size. An epoch's last batch may be
smaller (kept, as PyTorch's DataLoader keeps it; one smaller than the world joins the batch before), and each
rank's loss is weighted by its share so the averaged gradient is still that of the global batch's mean loss.
Rank 0 alone validates and keeps the best weights; its early-stopping decision is broadcast, so every rank
stops at the same epoch (a rank that stopped alone would leave the others waiting in a collective)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from g2d.config import Recipe
from g2d.errors import G2DError
from g2d.pipeline import distributed, runtime


class TrainingError(G2DError):
    """Training went wrong in a way that is a bug (a frozen encoder that changed)."""


@dataclass
class FitResult:
    epochs: int = 0
    steps: int = 0
    best_epoch: int = 0
    best_loss: float = math.nan  # val loss of the kept weights
    best_score: float = math.nan  # val score of the kept weights
    stopped_early: bool = False
    history: list[list[float]] = field(default_factory=list)  # [epoch, steps, train loss, val loss, val score]


@dataclass(frozen=True)
class Setup:
    """Where and how the loop runs: the process group, the device, and params.compute's precision
    (already resolved: bf16 / fp16 / fp32) and memory layout."""

    ctx: distributed.Context = distributed.SINGLE
    dev: torch.device = torch.device("cpu")
    precision: str = "fp32"
    channels_last: bool = False

    @property
    def layout(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of images in the training memory layout."""
        return x.contiguous(memory_format=self.layout)

    def wrap(self, module: nn.Module, find_unused: bool = False) -> nn.Module:
        """The module to train through: DDP over the process group (batch norms over the global batch), or
        `module` itself in one process. Call before `fit`, which builds the optimizer on the parameters the
        wrapped module holds."""
        return distributed.wrap(module, self.ctx, self.dev, find_unused)


SINGLE = Setup()  # one process on the CPU in fp32: what the loop did before torchrun and `compute`


def epoch_batches(n: int, batch_size: int, generator: torch.Generator, world: int = 1,
                  rows: int = 0) -> list[torch.Tensor]:
    """One epoch: a seeded permutation of the n rows cut into batches; the last may be smaller, and one with
    fewer rows than processes joins the batch before it. With `rows` > n the epoch covers that many rows:
    fresh permutations one after another (as torch's RandomSampler with num_samples), cut where `rows` ends."""
    passes = max(1, math.ceil(rows / n))
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(passes)])[:max(n, rows)]
    cuts = list(order.split(batch_size))
    if len(cuts) > 1 and len(cuts[-1]) < world:
        cuts[-2:] = [torch.cat(cuts[-2:])]
    return cuts


def steps_per_epoch(n: int, batch_size: int, world: int = 1, rows: int = 0) -> int:
    return len(epoch_batches(n, batch_size, torch.Generator().manual_seed(0), world, rows))


def epoch_rows(recipe: Recipe, n_split: int) -> int:
    """The rows an epoch covers at least: none beyond one pass (`pass`), or the whole train split's (`full-set`)."""
    return n_split if recipe.epoch_length == "full-set" else 0


def _better(value: float, best: float, monitor: str) -> bool:
    if math.isnan(value):
        return False
    return math.isnan(best) or (value < best if monitor == "loss" else value > best)


def fit(model: nn.Module, n_train: int, recipe: Recipe, seed: int,
        step_loss: Callable[[torch.Tensor, int], torch.Tensor], validate: Callable[[], dict[str, float]],
        advance: Callable[[int], None] = lambda n: None, log: Callable[[dict, int], None] = lambda m, s: None,
        setup: Setup = SINGLE, epoch_rows: int = 0) -> FitResult:
    """Train `model` on n_train rows, an epoch covering at least `epoch_rows` of them (see `epoch_rows`).
    `step_loss(rows, epoch)` is the loss of this rank's rows of a step's batch, computed through
    the module `setup.wrap` returned; `validate()` gives {"loss", "score"} of `model` itself on val (called on
    rank 0 only). Metrics are logged with the epoch as the step."""
    ctx = setup.ctx
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=recipe.lr, weight_decay=recipe.weight_decay)
    scaler = runtime.grad_scaler(setup.dev, setup.precision)
    if ctx.active:
        runtime.seed_everything(seed + ctx.rank)  # any dropout: noise of its own on every rank
    result, best_state, waited = FitResult(), None, 0
    order = torch.Generator().manual_seed(seed)
    for epoch in range(1, recipe.epochs + 1):
        model.train()
        total, seen = 0.0, 0
        for idx in epoch_batches(n_train, recipe.batch_size, order, ctx.world, epoch_rows):  # the same on every rank
            mine = idx[ctx.rank::ctx.world]
            with runtime.autocast(setup.dev, setup.precision):
                loss = step_loss(mine, epoch)
            if len(idx) % ctx.world:  # uneven shares: DDP's average of the weighted losses is the global mean
                loss = loss * (len(mine) * ctx.world / len(idx))
            value = distributed.mean(ctx, {"loss": float(loss.detach())})["loss"]  # the global batch's loss
            if not math.isfinite(value):  # every rank sees the same value, so every rank stops here
                raise runtime.NonFiniteLoss(
                    f"fine-tuning loss is {value} at step {result.steps + 1} (epoch {epoch}, train rows "
                    f"{idx[:8].tolist()}); lower the task's lr or check these images", result.steps + 1, idx.tolist())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            result.steps += 1
            total, seen = total + value * len(idx), seen + len(idx)
            advance(1)
        result.epochs = epoch
        val, stop = {"loss": math.nan, "score": math.nan}, False
        if ctx.main:
            model.eval()
            with torch.no_grad(), runtime.autocast(setup.dev, setup.precision):
                val = {k: float(v) for k, v in validate().items()}
            if _better(val[recipe.monitor], getattr(result, f"best_{recipe.monitor}"), recipe.monitor):
                result.best_epoch, result.best_loss, result.best_score, waited = epoch, val["loss"], val["score"], 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                waited += 1
            stop = waited >= recipe.patience
        val, stop = distributed.broadcast(ctx, (val, stop))
        log({"train/loss": total / seen, "val/loss": val["loss"], "val/score": val["score"]}, epoch)
        result.history.append([epoch, result.steps, total / seen, val["loss"], val["score"]])
        if stop:
            result.stopped_early = epoch < recipe.epochs
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    else:  # the monitored value never defined (e.g. one class only in val), or not rank 0: the last weights
        result.best_epoch = result.epochs
    model.eval()
    return result


@torch.no_grad()
def in_batches(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, size: int = 64) -> torch.Tensor:
    """fn over images in chunks, concatenated (inference on a whole split)."""
    return torch.cat([fn(images[i:i + size]) for i in range(0, len(images), size)])


@torch.no_grad()
def on_shares(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, ctx: distributed.Context,
              size: int = 64) -> torch.Tensor:
    """`in_batches` with the rows dealt over the ranks (rank r computes rows r::world), gathered in row order
    on every rank: inference every rank needs the whole of, at 1/world of the cost."""
    if not ctx.active:
        return in_batches(fn, images, size)
    mine = in_batches(fn, images[ctx.rank::ctx.world], size)
    parts = distributed.gather(ctx, mine.cpu())
    out = torch.empty((len(images), *mine.shape[1:]), dtype=mine.dtype)
    for r, part in enumerate(parts):
        out[r::ctx.world] = part
    return out.to(mine.device)
