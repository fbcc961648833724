"""The fine-tuning loop shared by every task: a fixed budget of AdamW steps over seeded batches,
validation every `eval_every` steps, early stopping after `patience` validations without improvement,
and the best validated weights restored at the end (test metrics are taken there)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from g2d.config import Steps
from g2d.errors import G2DError


class TrainingError(G2DError):
    """Training cannot go on (a non-finite loss)."""


@dataclass
class FitResult:
    steps: int = 0
    best_step: int = 0
    best_val: float = math.nan
    stopped_early: bool = False
    history: list[list[float]] = field(default_factory=list)  # [step, train loss, val score or nan]


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
        log: Callable[[dict, int], None] = lambda m, s: None) -> FitResult:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=recipe.lr, weight_decay=recipe.weight_decay)
    result, best_state, waited = FitResult(), None, 0
    source = batches(n_train, recipe.batch_size, seed)
    for step in range(1, recipe.max_steps + 1):
        idx = next(source)
        model.train()
        loss = step_loss(idx)
        if not torch.isfinite(loss):
            raise TrainingError(f"fine-tuning loss is {float(loss)} at step {step} (train rows {idx[:8].tolist()}); "
                                "lower the task's lr or check these images")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss = float(loss.detach())
        result.steps = step
        advance(1)
        val = math.nan
        if step % recipe.eval_every == 0 or step == recipe.max_steps:
            model.eval()
            with torch.no_grad():
                val = float(validate())
            if not math.isnan(val) and (math.isnan(result.best_val) or val > result.best_val):
                result.best_val, result.best_step, waited = val, step, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                waited += 1
            log({"val/score": val}, step)
        log({"train/loss": loss}, step)
        result.history.append([step, loss, val])
        if waited >= recipe.patience:
            result.stopped_early = step < recipe.max_steps
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    else:  # validation never defined (e.g. one class only in val): the last weights
        result.best_step = result.steps
    model.eval()
    return result


@torch.no_grad()
def in_batches(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, size: int = 64) -> torch.Tensor:
    """fn over images in chunks, concatenated (inference on a whole split)."""
    return torch.cat([fn(images[i:i + size]) for i in range(0, len(images), size)])
