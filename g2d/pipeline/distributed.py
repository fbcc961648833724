"""Training across processes with PyTorch's own engine: `torchrun` starts the processes and sets
RANK / WORLD_SIZE / LOCAL_RANK, and this module turns them into a process group, a device per
process and a DistributedDataParallel model.

The batch size in params is the *global* batch: each of the N ranks takes 1/N of every step's batch,
so the number of steps, the learning-rate schedule and the set of InfoNCE negatives (gathered across
ranks) do not depend on how many processes share the work. Batch-norm statistics are synchronised
over the global batch too (torch's SyncBatchNorm on GPUs; `GlobalBatchNorm` below where torch has none,
i.e. the CPU / gloo backend), which is what makes 2 ranks train like 1 rank with the same batch.

Only rank 0 talks to MLflow and writes files; the other ranks compute and wait at barriers.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from g2d.errors import ConfigError


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, batch_size: int, what: str) -> int:
        """This rank's share of a global batch, which must split evenly."""
        if batch_size % self.world:
            raise ConfigError(f"{what} = {batch_size} does not split over {self.world} processes; use a multiple of "
                              f"{self.world} (it is the global batch, shared by all ranks)")
        return batch_size // self.world


SINGLE = Context()


def from_environment() -> Context:
    """The process group torchrun describes (joined once per process), or the single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    return Context(rank, world, local)


def device(ctx: Context) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", ctx.local_rank)
    return torch.device("cpu")


def barrier(ctx: Context) -> None:
    if ctx.active:
        dist.barrier()


def mean(ctx: Context, values: dict[str, float]) -> dict[str, float]:
    """The mean over ranks of per-rank values (each rank's loss is over its own share of the batch)."""
    if not ctx.active:
        return values
    # NCCL reduces CUDA tensors only ("No backend type associated with device type cpu"); gloo takes CPU ones
    where = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=where)
    dist.all_reduce(t)
    return dict(zip(values, (t / ctx.world).tolist(), strict=True))


def broadcast(ctx: Context, value):
    """Rank 0's value of a picklable object, on every rank."""
    if not ctx.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(ctx: Context, value) -> list:
    """Every rank's value of a picklable object, in rank order, on every rank."""
    if not ctx.active:
        return [value]
    out = [None] * ctx.world
    dist.all_gather_object(out, value)
    return out


def shutdown(ctx: Context) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose statistics are those of the global batch, on any backend: per-channel sums and
    counts, then squared deviations, are summed over ranks with autograd, so the gradient is that of one
    process holding the whole batch. Used where torch's SyncBatchNorm refuses (CPU)."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized():
            return super().forward(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, channels] + [1] * (x.dim() - 2)
        xf = x.float()
        # two passes (the mean, then squared deviations from it): E[x^2] - E[x]^2 loses the variance
        # to cancellation when the mean is large against the spread
        totals = _sum_over_ranks(torch.cat([xf.sum(dims), xf.new_tensor([x.numel() / channels])]))
        n = totals[-1]
        mean = totals[:channels] / n
        centred = xf - mean.view(shape)
        var = _sum_over_ranks((centred * centred).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def _sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a tensor, differentiable: every rank's gradient flows back to its own x."""
    from torch.distributed._functional_collectives import all_gather_tensor_autograd

    return all_gather_tensor_autograd(x[None], gather_dim=0, group=dist.group.WORLD).sum(0)


def sync_batch_norm(model: nn.Module, dev: torch.device) -> nn.Module:
    """Every batch norm of `model` computed over the global batch."""
    if dev.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert(model)


def _convert(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        out.load_state_dict(module.state_dict())
        out.train(module.training)
        out.requires_grad_(any(p.requires_grad for p in module.parameters()) if module.affine else False)
    for name, child in module.named_children():
        out.add_module(name, _convert(child))
    return out


def wrap(model: nn.Module, ctx: Context, dev: torch.device, find_unused: bool) -> nn.Module:
    """The model as DDP over the process group (the model itself when single-process). `find_unused`
    when some parameters get no gradient on some steps (the decoder before the dense warm-up ends)."""
    if not ctx.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [dev.index] if dev.type == "cuda" else None
    return DistributedDataParallel(sync_batch_norm(model, dev), device_ids=ids, find_unused_parameters=find_unused)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


@contextlib.contextmanager
def main_first(ctx: Context):
    """Rank 0 runs the block first (e.g. to write a cache), the others after it is done."""
    if not ctx.main:
        barrier(ctx)
    yield
    if ctx.main:
        barrier(ctx)
