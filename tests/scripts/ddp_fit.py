"""Run under torchrun by tests/test_distributed_finetune.py: the fine-tuning loop (g2d/pipeline/finetune/
fit.py) on N ranks against the same loop in one process, on a train set smaller than the batch whose rows do
not split evenly (5 rows over 2 ranks: shares of 3 and 2, weighted), through a batch norm over the global batch
and with early stopping decided on rank 0. Prints one line per rank: rank, steps, best epoch, the largest
relative difference of the weights and of the logged losses."""

from __future__ import annotations

import copy

import torch
from torch import nn

from g2d.config import Recipe
from g2d.pipeline import distributed
from g2d.pipeline.finetune import fit as loop


def main() -> None:
    ctx = distributed.from_environment()
    torch.manual_seed(0)
    # no bias before the batch norm: its gradient is zero in exact arithmetic, and Adam would turn the rounding
    # noise standing in for it into full-size steps
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 1))
    reference = copy.deepcopy(model)
    x, y = torch.randn(5, 3, generator=torch.Generator().manual_seed(1)), torch.randn(5, 1)
    xv, yv = torch.randn(6, 3), torch.randn(6, 1)
    recipe = Recipe(batch_size=8, epochs=30, lr=0.05, patience=2, monitor="score")

    def run(net: nn.Module, setup: loop.Setup) -> tuple[loop.FitResult, list[float]]:
        trained = setup.wrap(net)
        losses: list[float] = []

        def step_loss(idx: torch.Tensor, epoch: int) -> torch.Tensor:
            return ((trained(x[idx]) - y[idx]) ** 2).mean()

        def validate() -> dict:
            loss = float(((net(xv) - yv) ** 2).mean())
            return {"loss": loss, "score": -loss}

        def log(metrics: dict, step: int) -> None:
            if "train/loss" in metrics:
                losses.append(metrics["train/loss"])

        return loop.fit(net, len(x), recipe, 0, step_loss, validate, log=log, setup=setup), losses

    one, one_losses = run(reference, loop.Setup())
    two, two_losses = run(model, loop.Setup(ctx))
    # rank 0 restored its best state as the single process did; the other ranks keep their last weights
    worst = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
                for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True)
                if a.is_floating_point()) if ctx.main else 0.0
    loss_gap = max(abs(a - b) / abs(b) for a, b in zip(two_losses, one_losses, strict=True))
    print(f"rank {ctx.rank} steps {one.steps} {two.steps} best {one.best_epoch} {two.best_epoch} stopped "
          f"{one.stopped_early} {two.stopped_early} weights {worst:.3e} losses {loss_gap:.3e}", flush=True)
    distributed.shutdown(ctx)


if __name__ == "__main__":
    main()
