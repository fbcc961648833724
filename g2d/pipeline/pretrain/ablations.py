"""The study's pre-training variants (params `study.ablations`): how `g2d pretrain --variant NAME` turns a
variant into the same pre-training as `pretrain`, on the study's budget, with the variant's overrides, written
beside the other ablations (models/ablations/NAME, metrics/ablations/NAME.json, registered g2d-ablation-NAME).

`--seed S` pre-trains the same variant again with another seed (NAME-seedS): grounding is zero-shot, so the
only spread between runs it can show is pre-training's, and G2D against global-only over phrases needs it."""

from __future__ import annotations

from g2d.config import Params
from g2d.errors import ConfigError

FOLDER = "ablations"
GROUNDING = "grounding"  # metrics/ablations/grounding/<task>_<run>.json: `g2d ground --variant`


def run_name(params: Params, name: str, seed: int | None = None) -> str:
    """NAME for the variant (pre-trained with the params' seed), NAME-seedS for its rerun with seed S."""
    return name if seed is None else f"{name}-seed{seed}"


def check_name(params: Params, name: str) -> str:
    known = params.study.ablations
    if name not in known:
        raise ConfigError(f"--variant {name!r} is not a name in study.ablations ({', '.join(known) or 'none defined'});"
                          " add it there with the --set overrides it makes")
    return name


def variant_overrides(params: Params, name: str, seed: int | None = None) -> list[str]:
    """The `--set` overrides that make params pre-train variant `name`: the budget, the variant, where it goes."""
    known = params.study.ablations
    run = run_name(params, check_name(params, name), seed)
    where = [f"paths.models={params.paths.models.rstrip('/')}/{FOLDER}",
             f"paths.metrics={params.paths.metrics.rstrip('/')}/{FOLDER}",
             f"pretrain.name={run}", f"pretrain.register_as=g2d-ablation-{run}"]
    return [*params.study.budget, *known[name], *where, *([] if seed is None else [f"seed={seed}"])]


def model_folder(params: Params, name: str, seed: int | None = None) -> str:
    """Where the variant's pre-trained encoder is (an --init for g2d train, a --model for g2d ground)."""
    return f"{params.paths.models.rstrip('/')}/{FOLDER}/{run_name(params, name, seed)}"


def grounding_folder(params: Params) -> str:
    """Where `g2d ground --variant` writes its metrics: beside the variants' pre-training metrics."""
    return f"{params.paths.metrics.rstrip('/')}/{FOLDER}/{GROUNDING}"
