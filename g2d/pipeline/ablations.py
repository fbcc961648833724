"""The study's pre-training variants (params `study.ablations`): how `g2d pretrain --variant NAME` turns a
variant into the same pre-training as `pretrain`, on the study's budget, with the variant's overrides, written
beside the other ablations (models/ablations/NAME, metrics/ablations/NAME.json, registered g2d-ablation-NAME)."""

from __future__ import annotations

from g2d.config import Params
from g2d.errors import ConfigError

FOLDER = "ablations"


def variant_overrides(params: Params, name: str) -> list[str]:
    """The `--set` overrides that make params pre-train variant `name`: the budget, the variant, where it goes."""
    known = params.study.ablations
    if name not in known:
        raise ConfigError(f"--variant {name!r} is not a name in study.ablations ({', '.join(known) or 'none defined'});"
                          " add it there with the --set overrides it makes")
    where = [f"paths.models={params.paths.models.rstrip('/')}/{FOLDER}",
             f"paths.metrics={params.paths.metrics.rstrip('/')}/{FOLDER}",
             f"pretrain.name={name}", f"pretrain.register_as=g2d-ablation-{name}"]
    return [*params.study.budget, *known[name], *where]


def model_folder(params: Params, name: str) -> str:
    """Where the variant's pre-trained encoder is (an --init for g2d train)."""
    return f"{params.paths.models.rstrip('/')}/{FOLDER}/{name}"
