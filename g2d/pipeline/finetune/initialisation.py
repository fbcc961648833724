"""Where a downstream model's encoder comes from (`g2d train --init SPEC`).

SPEC is one of: a name in `finetune.inits` (the matrix's `g2d`, `global`, `random`), `random`, a model
folder written by `g2d pretrain` (or pulled with `g2d models pull`), a pre-training checkpoint file
(`models/pretrain-checkpoints/checkpoint.pt`), or a registered model (`models:/g2d-encoder/latest`,
`g2d-encoder@champion`). Everything is checked before any training or tracking starts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from g2d.config import Model, Params
from g2d.errors import ConfigError, G2DError
from g2d.pipeline import model_files, runtime

RANDOM = model_files.RANDOM


class InitError(G2DError):
    """An --init that does not exist or is not a pre-trained encoder."""


@dataclass
class Init:
    name: str  # the matrix name, or the spec as given
    source: str  # what it resolved to: random, a path, or models:/NAME/VERSION
    model: Model  # builds the U-Net the weights fit
    unet_state: dict[str, torch.Tensor] | None  # U-Net weights (encoder.*, decoder.*, ...); None = random
    sha256: str = ""  # of the weights file
    dense: str | None = None  # the dense pretext it was pre-trained with (none = global only)


def resolve(spec: str, params: Params, root: Path) -> Init:
    with model_files.locate(spec, params.finetune.inits, root, params.tracking.uri, "--init", InitError) as found:
        if found.path is None:
            return Init(found.name, RANDOM, params.model, None)
        init = _from_path(found.name, found.path)
        init.source = found.source
        return init


def _from_path(name: str, path: Path) -> Init:
    if path.is_dir():
        return _from_folder(name, path)
    if path.suffix == ".pt":
        return _from_checkpoint(name, path)
    raise InitError(f"--init {path}: expected a model folder (model.safetensors + config.yaml) or a .pt "
                    "pre-training checkpoint")


def _check_kind(config: dict, where: Path) -> None:
    kind = config.get("kind", model_files.ENCODER_KIND)
    if kind != model_files.ENCODER_KIND:
        raise InitError(f"--init {where}: a {kind} model (task {config.get('task', '?')}), not a pre-trained "
                        "encoder; use a model from `g2d pretrain` (models:/g2d-encoder/latest) or 'random'")


def _from_folder(name: str, folder: Path) -> Init:
    weights, config_path = folder / model_files.WEIGHTS, folder / model_files.CONFIG
    if not weights.is_file() or not config_path.is_file():
        raise InitError(f"--init {folder}: not a model folder (needs {model_files.WEIGHTS} and {model_files.CONFIG})")
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
        _check_kind(config, folder)
        cfg = Model.model_validate(config["model"])
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as e:
        raise InitError(f"--init {config_path}: not a g2d model config ({type(e).__name__}: {e})") from None
    state = model_files.read_weights(weights, InitError, "--init")  # never unpickles
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    return Init(name, str(folder), cfg, _unet_part(state, weights), digest, config.get("dense"))


def _from_checkpoint(name: str, path: Path) -> Init:
    try:
        state = runtime.load_checkpoint(path)
    except runtime.CheckpointError:
        raise InitError(f"--init {path}: not a readable g2d pre-training checkpoint; give a checkpoint.pt written "
                        "by `g2d pretrain`, a model folder or 'random'") from None
    try:
        identity = json.loads(state["identity"])
        cfg = Model.model_validate({k.removeprefix("model."): v for k, v in identity.items()
                                    if k.startswith("model.")})
        weights = state["model"]
    except (KeyError, TypeError, ValueError) as e:
        raise InitError(f"--init {path}: not a g2d pre-training checkpoint ({type(e).__name__}: {e})") from None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return Init(name, str(path), cfg, _unet_part(weights, path), digest, identity.get("pretrain.dense"))


def _unet_part(state: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    unet = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    if not any(k.startswith("encoder.") for k in unet):
        raise InitError(f"--init {where}: holds no U-Net encoder weights (unet.encoder.*)")
    return unet


def build_unet(init: Init, with_decoder: bool) -> torch.nn.Module:
    """The smp U-Net of `init.model`, with the pre-trained encoder (and decoder + head when asked)."""
    from g2d.model.towers import build_unet as build

    unet = build(init.model)
    if init.unet_state is None:
        return unet
    try:
        encoder = {k.removeprefix("encoder."): v for k, v in init.unet_state.items() if k.startswith("encoder.")}
        unet.encoder.load_state_dict(encoder, strict=True)
        if with_decoder:
            rest = {k: v for k, v in init.unet_state.items() if not k.startswith("encoder.")}
            missing, unexpected = unet.load_state_dict(rest, strict=False)
            if unexpected or [k for k in missing if not k.startswith("encoder.")]:
                raise RuntimeError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    except RuntimeError as e:
        raise ConfigError(f"--init {init.source}: weights do not fit model {init.model.encoder} ({e})") from None
    return unet
