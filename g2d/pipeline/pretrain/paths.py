"""Where a pre-training run reads and writes, from params alone: its data, its model folder, its checkpoints
and its metrics file. Shared by the stage, `g2d bench` (the same data) and `g2d preflight` (the same checks),
which import this small module rather than the stage."""

from __future__ import annotations

from pathlib import Path

from g2d import tracking
from g2d.config import Params, resolve_path

CHECKPOINT = "checkpoint.pt"  # the latest checkpoint, in the checkpoints folder


def paths(params: Params) -> tuple[Path, Path, Path, Path]:
    """(data, model folder, checkpoints folder, metrics file) of the run params describe."""
    root = tracking.project_root()
    data = (resolve_path(root, params.pretrain.dataset) if params.pretrain.dataset
            else resolve_path(root, params.paths.synthcxr) / "pretrain")
    name = params.pretrain.name
    out = resolve_path(root, params.paths.models) / name
    ckpt_dir = resolve_path(root, params.paths.models) / f"{name}-checkpoints"
    metrics = resolve_path(root, params.paths.metrics) / f"{name}.json"
    return data, out, ckpt_dir, metrics
