"""One image in, what the model sees out: the inference API behind `g2d explain`.

    import g2d
    model = g2d.load_model("models:/g2d-encoder/latest")     # or "g2d", a model folder, NAME@ALIAS
    out = g2d.predict("chest.dcm", ["pleural effusion", "no pleural effusion"], model=model)
    out.scores      # (P,) cosine similarity of the image's global embedding with each prompt
    out.heatmaps    # (P, H, W) similarity of each prompt with every location, at the image's own size

An image is a DICOM (MONOCHROME1 inverted, VOI LUT / window applied), PNG or JPG path, a 2-D array
(floats in [0, 1], or uint8), or a PIL image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from g2d.config import Params
from g2d.errors import ConfigError, DataError


@dataclass
class Prediction:
    prompts: list[str]
    scores: np.ndarray  # (P,) in [-1, 1]
    heatmaps: np.ndarray  # (P, H, W) in [-1, 1], H x W = the input image's size
    image: np.ndarray  # (H, W) in [0, 1], as read
    model: str  # where the model came from (a path or models:/NAME/VERSION)

    def pointing(self, box: tuple[float, float, float, float]) -> list[bool]:
        """Per prompt: is the heat map's maximum inside the box (x0, y0, x1, y1, pixels)?"""
        x0, y0, x1, y1 = box
        hits = []
        for heat in self.heatmaps:
            y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
            hits.append(bool(x0 <= x < x1 and y0 <= y < y1))
        return hits


def _params(params: Params | str | Path | None) -> Params:
    from g2d import tracking
    from g2d.config import load_params, validate

    if isinstance(params, Params):
        return params
    path = Path(params) if params is not None else tracking.project_root() / "params.yaml"
    return load_params(path) if params is not None or path.is_file() else validate({}, "defaults")


def load_model(model: str = "g2d", params: Params | str | Path | None = None):
    """A pre-trained G2D encoder with its text tower (pipeline.zeroshot.encoders.Pretrained), in eval mode."""
    from g2d import tracking
    from g2d.pipeline import runtime
    from g2d.pipeline.zeroshot import encoders

    pre = encoders.load(model, _params(params), tracking.project_root())
    pre.model.to(runtime.device())
    return pre


def as_image(image) -> np.ndarray:
    """Any accepted image as a 2-D float array in [0, 1]: integers by their type's full range (as files
    are read), floats as given."""
    from PIL import Image

    from g2d.data.images import read_image

    if isinstance(image, str | Path):
        return read_image(image)
    if isinstance(image, Image.Image):
        image = np.asarray(image if image.mode.startswith(("I", "F", "L")) else image.convert("L"))
    array = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image).squeeze()
    if array.ndim != 2:
        raise DataError(f"image: expected a 2-D gray image, got shape {array.shape}")
    if array.dtype.kind in "iu":
        top = 65535 if array.dtype.itemsize >= 2 and array.max() <= 65535 else np.iinfo(array.dtype).max
        return np.clip(array.astype(np.float32) / top, 0, 1)
    array = array.astype(np.float32)
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise DataError(f"image: a {array.dtype} array must hold finite values in [0, 1]; pass integer pixels "
                        "as integers (uint8, uint16), which are scaled by their range")
    return array


@torch.no_grad()
def predict(image, prompts: str | list[str], model="g2d", params: Params | str | Path | None = None) -> Prediction:
    """Similarity of the image with each prompt, globally and at every location."""
    from g2d.pipeline.zeroshot import similarity

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or any(not p.strip() for p in prompts):
        raise ConfigError("prompts: give at least one non-empty prompt, e.g. 'pleural effusion'")
    pre = model if hasattr(model, "tokenizer") else load_model(model, params)
    pixels = as_image(image)
    texts = similarity.embed_texts(pre.model, pre.tokenizer, prompts)
    embedded = similarity.embed_images(pre.model, similarity.to_model_input(pixels, pre.image_size))
    heat = similarity.similarity_maps(embedded.maps, texts, pixels.shape)[0]
    scores = (embedded.pooled @ texts.T)[0]
    return Prediction(prompts, scores.numpy(), heat.numpy(), pixels, pre.source)


FIGURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg")


def explain(image, prompts: str | list[str], out: str | Path, model="g2d", box=None,
            params: Params | str | Path | None = None) -> tuple[Prediction, Path]:
    """`predict`, drawn: the image and, per prompt, its heat map with contours (and the truth box)."""
    from g2d.pipeline.figures import explain_figure
    from g2d.pipeline.zeroshot.similarity import scale01

    out = Path(out)
    if out.suffix.lower() not in FIGURE_SUFFIXES:
        raise ConfigError(f"--out {out}: name a figure file ending in {', '.join(FIGURE_SUFFIXES)}")
    pixels = as_image(image)
    if box is not None:
        h, w = pixels.shape
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise ConfigError(f"--box {','.join(f'{v:g}' for v in box)}: not inside the image ({w} x {h} px); "
                              "give x0,y0,x1,y1 in pixels of the image as stored")
    pred = predict(pixels, prompts, model, params)
    heats = [scale01(torch.from_numpy(h)).numpy() for h in pred.heatmaps]
    name = Path(image).name if isinstance(image, str | Path) else "image"
    path = explain_figure(pred.image, heats, pred.prompts, [float(s) for s in pred.scores], box,
                          f"{name}, model {pred.model}", out)
    return pred, path
