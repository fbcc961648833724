"""The fine-tuning loop shared by every task: a fixed budget of AdamW steps over seeded batches,
validation every `eval_every` steps, early stopping after `patience` validations without improvement,
and the best validated weights restored at the end (test metrics are taken there).

One process, or several under torchrun (`Setup.ctx`, g2d/pipeline/distributed.py). The task's
`batch_size` is the *global* batch: the seeded batches are the same on every rank and rank r trains on
rows idx[r::world] of each, through DDP (gradients averaged over ranks, batch norms over the global
batch), so the number of steps and the result do not depend on the world size. A train set smaller
than the batch is the batch; its shares may then differ by one row, and each rank's loss is weighted by
its share so the averaged gradient is still that of the global batch's mean loss. Rank 0 alone
validates and keeps the best weights; its early-stopping decision is broadcast, so every rank stops at
the same step (a rank that stopped alone would leave the others waiting in a collective)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from g2d.config import Steps
from g2d.errors import G2DError
from g2d.pipeline import distributed, runtime


class TrainingError(G2DError):
    """Training went wrong in a way that is a bug (a frozen encoder that changed)."""


@dataclass
class FitResult:
    steps: int = 0
    best_step: int = 0
    best_val: float = math.nan
    stopped_early: bool = False
    history: list[list[float]] = field(default_factory=list)  # [step, train loss, val score or nan]


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


def batches(n: int, batch_size: int, seed: int):
    """Endless batches of row indices: seeded permutations, one after another; a batch never holds a
    row twice, and a train set smaller than the batch is the batch."""
    g = torch.Generator().manual_seed(seed)
    size = min(batch_size, n)
    pending: list[int] = []
    while True:
        if len(pending) < size:
            pending = torch.randperm(n, generator=g).tolist()
        yield torch.tensor(pending[:size])
        pending = pending[size:]


def fit(model: nn.Module, n_train: int, recipe: Steps, seed: int, step_loss: Callable[[torch.Tensor], torch.Tensor],
        validate: Callable[[], float], advance: Callable[[int], None] = lambda n: None,
        log: Callable[[dict, int], None] = lambda m, s: None, setup: Setup = SINGLE) -> FitResult:
    """Train `model`. `step_loss(rows)` is the loss of this rank's rows of a step's batch, computed through
    the module `setup.wrap` returned; `validate()` scores `model` itself (called on rank 0 only)."""
    ctx = setup.ctx
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=recipe.lr, weight_decay=recipe.weight_decay)
    scaler = runtime.grad_scaler(setup.dev, setup.precision)
    if ctx.active:
        runtime.seed_everything(seed + ctx.rank)  # any dropout: noise of its own on every rank
    result, best_state, waited = FitResult(), None, 0
    source = batches(n_train, recipe.batch_size, seed)
    for step in range(1, recipe.max_steps + 1):
        idx = next(source)  # the global batch, the same on every rank
        mine = idx[ctx.rank::ctx.world]
        model.train()
        with runtime.autocast(setup.dev, setup.precision):
            loss = step_loss(mine)
        if len(idx) % ctx.world:  # uneven shares: DDP's average of the weighted losses is the global mean
            loss = loss * (len(mine) * ctx.world / len(idx))
        value = distributed.mean(ctx, {"loss": float(loss.detach())})["loss"]  # the global batch's loss
        if not math.isfinite(value):  # every rank sees the same value, so every rank stops here
            raise runtime.NonFiniteLoss(f"fine-tuning loss is {value} at step {step} (train rows {idx[:8].tolist()}); "
                                        "lower the task's lr or check these images", step, idx.tolist())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        result.steps = step
        advance(1)
        val, stop = math.nan, False
        if step % recipe.eval_every == 0 or step == recipe.max_steps:
            if ctx.main:
                model.eval()
                with torch.no_grad():
                    val = float(validate())
                if not math.isnan(val) and (math.isnan(result.best_val) or val > result.best_val):
                    result.best_val, result.best_step, waited = val, step, 0
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    waited += 1
                stop = waited >= recipe.patience
            val, stop = distributed.broadcast(ctx, (val, stop))
            log({"val/score": val}, step)
        log({"train/loss": value}, step)
        result.history.append([step, value, val])
        if stop:
            result.stopped_early = step < recipe.max_steps
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    else:  # validation never defined (e.g. one class only in val), or not rank 0: the last weights
        result.best_step = result.steps
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
