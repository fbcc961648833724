"""A trained G2D model as a folder of plain files: `model.safetensors` (weights, loading never
unpickles code), `config.yaml` (what builds the network again) and `model_card.md`."""

from __future__ import annotations

from pathlib import Path

import yaml

from g2d.config import Model
from g2d.errors import G2DError

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.yaml", "model_card.md"
ENCODER_KIND = "g2d-encoder"  # `kind` in config.yaml of a pre-trained model; fine-tuned ones name their task


class ModelFilesError(G2DError):
    """A model folder is incomplete or does not match its config."""


def save(model, image_size: int, folder: Path, card: str, extra: dict | None = None) -> Path:
    config = {"model": model.cfg.model_dump(mode="json"), "image_size": image_size, **(extra or {})}
    return save_folder(model, folder, config, card)


def save_folder(module, folder: Path, config: dict, card: str) -> Path:
    """Any network as weights + the config that rebuilds it + a model card."""
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    save_model(module, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    (folder / CARD).write_text(card)
    return folder


def read_config(folder: Path) -> dict:
    """config.yaml of a model folder (checked to exist with its weights)."""
    folder = Path(folder)
    for name in (WEIGHTS, CONFIG):
        if not (folder / name).is_file():
            raise ModelFilesError(f"{folder}: missing {name}; is this a folder from `g2d models pull`?")
    try:
        config = yaml.safe_load((folder / CONFIG).read_text())
    except yaml.YAMLError as e:
        raise ModelFilesError(f"{folder / CONFIG}: not valid YAML ({e})") from None
    if not isinstance(config, dict) or "model" not in config:
        raise ModelFilesError(f"{folder / CONFIG}: not a g2d model config (no 'model' section)")
    return config


def load(folder: Path):
    """(model in eval mode, tokenizer, config dict) from a folder written by `save`."""
    from safetensors.torch import load_model

    from g2d.model.g2d import G2D
    from g2d.model.towers import load_tokenizer

    folder = Path(folder)
    for name in (WEIGHTS, CONFIG):
        if not (folder / name).is_file():
            raise ModelFilesError(f"{folder}: missing {name}; is this a folder from `g2d models pull`?")
    try:
        config = yaml.safe_load((folder / CONFIG).read_text())
        cfg = Model.model_validate(config["model"])
        image_size = int(config["image_size"])
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as e:
        raise ModelFilesError(f"{folder / CONFIG}: not a g2d model config ({type(e).__name__}: {e})") from None
    tokenizer = load_tokenizer(cfg)
    model = G2D(cfg, tokenizer.vocab_size, image_size)
    try:
        load_model(model, str(folder / WEIGHTS), strict=True)
    except (RuntimeError, OSError) as e:
        raise ModelFilesError(f"{folder / WEIGHTS}: does not fit the network in {CONFIG} ({e})") from None
    return model.eval(), tokenizer, config
