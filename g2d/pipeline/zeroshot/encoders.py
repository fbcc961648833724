"""A pre-trained G2D model with both towers, for uses without labels (zero-shot, grounding, explain).

`--model SPEC` is a name in `finetune.inits` (`g2d`, `global`), a model folder written by `g2d pretrain`
or pulled with `g2d models pull`, or a registered encoder (`models:/g2d-encoder/latest`,
`g2d-encoder@champion`). Fine-tuning only needs the U-Net part (pipeline/finetune/initialisation.py); these
uses need the text tower, the projections and the attention pooling as well.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from g2d.config import Params
from g2d.errors import G2DError
from g2d.pipeline import model_files


class EncoderError(G2DError):
    """A --model that does not exist or is not a pre-trained G2D encoder."""


@dataclass
class Pretrained:
    name: str  # the spec as given (or the inits name)
    source: str  # a path relative to the project, or models:/NAME/VERSION
    model: object  # g2d.model.g2d.G2D in eval mode
    tokenizer: object
    config: dict  # the folder's config.yaml
    sha256: str  # of model.safetensors
    seed: int | None = None  # the pre-training seed (the folder's params.yaml), what pairs runs across models

    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    @property
    def label(self) -> str:
        """A file-name-safe name, e.g. for metrics/zeroshot/<task>_<label>.json."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.name).strip("-")[:60] or "model"


def load(spec: str, params: Params, root: Path) -> Pretrained:
    with model_files.locate(spec, params.finetune.inits, root, params.tracking.uri, "--model", EncoderError) as found:
        if found.path is None:
            raise EncoderError(f"--model {spec}: a random network has no trained text tower to compare with; give "
                               "a pre-trained encoder (g2d, global, a model folder or models:/g2d-encoder/latest)")
        return from_folder(found.name, found.source, found.path)


def from_folder(name: str, source: str, folder: Path) -> Pretrained:
    if not folder.is_dir():
        raise EncoderError(f"--model {folder}: expected a model folder (model.safetensors + config.yaml) from "
                           "`g2d pretrain` or `g2d models pull`")
    config = model_files.read_config(folder)
    kind = config.get("kind", model_files.ENCODER_KIND)
    if kind != model_files.ENCODER_KIND:
        raise EncoderError(f"--model {source}: a fine-tuned {kind} model (task {config.get('task', '?')}), not a "
                           "pre-trained encoder; use a model from `g2d pretrain` (models:/g2d-encoder/latest)")
    model, tokenizer, config = model_files.load(folder)
    digest = hashlib.sha256((folder / model_files.WEIGHTS).read_bytes()).hexdigest()
    return Pretrained(name, source, model, tokenizer, config, digest, _seed(folder))


def _seed(folder: Path) -> int | None:
    """The seed in the params.yaml that `g2d pretrain` writes beside the weights; None for folders without one."""
    path = folder / "params.yaml"
    if not path.is_file():
        return None
    try:
        seed = (yaml.safe_load(path.read_text()) or {}).get("seed")
    except (yaml.YAMLError, AttributeError) as e:
        raise EncoderError(f"--model {folder}: its params.yaml is not a YAML mapping ({e}); pull or pre-train the "
                           "model again") from None
    return int(seed) if isinstance(seed, int) else None
