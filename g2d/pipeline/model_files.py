"""A trained G2D model as a folder of plain files: `model.safetensors` (weights, loading never
unpickles code), `config.yaml` (what builds the network again) and `model_card.md`; and where a
model a user names on the command line lives (`locate`)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from g2d import tracking
from g2d.config import Model, resolve_path
from g2d.errors import G2DError

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.yaml", "model_card.md"
ENCODER_KIND = "g2d-encoder"  # `kind` in config.yaml of a pre-trained model; fine-tuned ones name their task
RANDOM = "random"


class ModelFilesError(G2DError):
    """A model folder is incomplete or does not match its config."""


@dataclass
class Located:
    name: str  # as given, or the finetune.inits name
    source: str  # a path relative to the project (else absolute), models:/NAME/VERSION, or 'random'
    path: Path | None  # the file or folder (a registry pull lives until the context ends); None = random


@contextmanager
def locate(spec: str, inits: dict[str, str], root: Path, uri: str | None, flag: str,
           error: type[G2DError] = ModelFilesError) -> Iterator[Located]:
    """SPEC is a name in `inits`, 'random', a path, or a registered model (models:/NAME/latest,
    NAME@ALIAS, NAME/VERSION), which is pulled into a temporary folder for the context's life."""
    name = spec
    if spec in inits:
        spec = inits[spec]
    if spec == RANDOM:
        yield Located(name, RANDOM, None)
        return
    path = resolve_path(root, spec)
    if path.exists():
        inside = path.resolve().is_relative_to(root.resolve())  # recorded relative: the same in every clone
        found = tracking.model_folder(path) if path.is_dir() else path  # a pulled MLflow model: g2d's files in it
        yield Located(name, path.resolve().relative_to(root.resolve()).as_posix() if inside else str(path), found)
        return
    if spec != name:
        raise error(f"{flag} {name}: {path} (finetune.inits.{name}) does not exist; train it first "
                    "(`dvc repro` or `g2d pretrain`)")
    try:
        info = tracking.resolve_model(spec, uri=uri)
    except G2DError as e:
        known = f"'random' or a name in finetune.inits ({', '.join(inits)})" if inits else "a model folder"
        raise error(f"{flag} {spec}: no such file or folder, not {known}, and not a registered model ({e})") from None
    source = f"models:/{info.name}/{info.version}"
    with tempfile.TemporaryDirectory(prefix="g2d-model-") as tmp:
        try:
            yield Located(name, source, tracking.pull_model(source, Path(tmp) / "pulled", uri=uri))
        except G2DError as e:  # its paths name a temporary folder, gone once this ends: name the version too
            if source not in str(e):
                e.args = (f"registered model {source}: {e}", *e.args[1:])
            raise


def save(model, image_size: int, folder: Path, card: str, extra: dict | None = None) -> Path:
    config = {"model": model.cfg.model_dump(mode="json"), "image_size": image_size, **(extra or {})}
    return save_folder(model, folder, config, card)


def save_folder(module, folder: Path, config: dict, card: str) -> Path:
    """Any network as weights + the config that rebuilds it + a model card."""
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    save_model(module, str(folder / WEIGHTS), force_contiguous=True)  # channels_last weights too
    (folder / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    (folder / CARD).write_text(card)
    return folder


def not_safetensors(path: Path, why: object, error: type[G2DError] = ModelFilesError, flag: str = "") -> G2DError:
    """The error for a weights file that is not safetensors (a pickle, a torch .pt renamed, damaged bytes)."""
    return error(f"{flag + ' ' if flag else ''}{path}: not a safetensors file ({why}); g2d loads model weights only "
                 "as safetensors and never unpickles a model file, which could run code. Give a model folder that "
                 "`g2d pretrain` / `g2d train` wrote (or a registered version of one); weights from elsewhere must "
                 "be re-exported with safetensors.torch.save_model")


def read_weights(path: Path, error: type[G2DError] = ModelFilesError, flag: str = "") -> dict:
    """name -> tensor of a safetensors file; never unpickles (a pickle payload is refused, unrun)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise not_safetensors(path, e, error, flag) from None


def load_weights(module, path: Path, error: type[G2DError] = ModelFilesError, flag: str = "") -> None:
    """safetensors' load_model (strict, shared tensors restored); a file that is not safetensors is refused
    before any byte of it is interpreted as anything but a JSON header and raw tensor data. A mismatch with
    the network raises RuntimeError for the caller to word."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        load_model(module, str(path), strict=True)
    except (SafetensorError, OSError) as e:
        raise not_safetensors(path, e, error, flag) from None


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
    from g2d.model.g2d import G2D
    from g2d.model.towers import load_tokenizer

    folder = Path(folder)
    config = read_config(folder)
    try:
        cfg = Model.model_validate(config["model"])
        image_size = int(config["image_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFilesError(f"{folder / CONFIG}: not a g2d model config ({type(e).__name__}: {e})") from None
    tokenizer = load_tokenizer(cfg)
    model = G2D(cfg, tokenizer.vocab_size, image_size)
    try:
        load_weights(model, folder / WEIGHTS)
    except RuntimeError as e:
        raise ModelFilesError(f"{folder / WEIGHTS}: does not fit the network in {CONFIG} ({e})") from None
    return model.eval(), tokenizer, config
