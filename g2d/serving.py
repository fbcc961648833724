"""What a registered g2d model does with a request, wherever it runs: `mlflow.pyfunc.load_model(...).predict`,
`mlflow models serve`, or Python. One row = one image (PNG, JPG or DICOM bytes) and, for a pre-trained
encoder, its prompts. Every answer is g2d's own: an encoder answers as `g2d.predict` (scores and heat maps at
the image's size); a fine-tuned model with what its task predicts (a mask, boxes, class probabilities).

A request g2d cannot answer raises `RequestError` with one line that names the row and what to change; the
MLflow wrapper (g2d/mlflow_model.py) turns it into an HTTP 400. No mlflow here: this module is plain g2d."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from g2d.errors import G2DError, ImageError

MAX_PIXELS = 1024 * 1024  # per image: an encoder answers a float heat map per prompt at the image's size
MAX_BYTES = 64 * 2**20  # per encoded image
MAX_PROMPTS = 32
DICOM_MAGIC = b"DICM"  # at byte 128 of a DICOM with its preamble


class RequestError(G2DError):
    """A request row the model cannot answer (not an image, too large, no prompt, ...)."""


@dataclass
class Served:
    kind: str  # g2d-encoder, segmentation, classification, detection
    config: dict
    model: object  # pipeline.zeroshot.encoders.Pretrained (encoder) or the fine-tuned network
    source: str

    @property
    def needs_prompts(self) -> bool:
        from g2d.pipeline.model_files import ENCODER_KIND

        return self.kind == ENCODER_KIND


def load(folder: Path, source: str | None = None) -> Served:
    """A g2d model folder (model.safetensors, config.yaml: what `g2d pretrain` / `g2d train` write)."""
    from g2d.pipeline import model_files
    from g2d.pipeline.finetune import stage as finetune
    from g2d.pipeline.zeroshot import encoders

    folder = Path(folder)
    config = model_files.read_config(folder)
    kind = config.get("kind", model_files.ENCODER_KIND)
    if kind == model_files.ENCODER_KIND:
        pre = encoders.from_folder(source or str(folder), source or str(folder), folder)
        return Served(kind, config, pre, pre.source)
    net, config = finetune.load_model(folder)
    return Served(kind, config, net, source or str(folder))


def decode(data: bytes | bytearray | str, row: int) -> np.ndarray:
    """Image bytes (PNG / JPG / DICOM; base64 is decoded by MLflow's scoring server) -> [0, 1] gray."""
    from g2d.data.images import read_image

    if isinstance(data, str):
        raise RequestError(f"row {row}: 'image' is text, not image bytes; send the file's bytes base64-encoded "
                           "in a binary column (dataframe_split / dataframe_records)")
    data = bytes(data)
    if not data:
        raise RequestError(f"row {row}: 'image' is empty; send the bytes of a PNG, JPG or DICOM file")
    if len(data) > MAX_BYTES:
        raise RequestError(f"row {row}: the image is {len(data):,} bytes, over the limit of {MAX_BYTES:,}; send a "
                           "smaller file")
    suffix = ".dcm" if data[128:132] == DICOM_MAGIC else ""
    with tempfile.TemporaryDirectory(prefix="g2d-request-") as tmp:
        path = Path(tmp) / f"image{suffix}"
        path.write_bytes(data)
        try:
            pixels = read_image(path)
        except ImageError as e:
            raise RequestError(f"row {row}: the {e.noun} {e.problem}; send a single-frame PNG, JPG or DICOM"
                               + (f" ({e.detail})" if e.detail and len(e.detail) < 200 else "")) from None
    h, w = pixels.shape
    if h * w > MAX_PIXELS:
        raise RequestError(f"row {row}: the image is {w} x {h} px, over the limit of {MAX_PIXELS:,} pixels "
                           f"({int(MAX_PIXELS ** 0.5)} x {int(MAX_PIXELS ** 0.5)}): downscale it first")
    return pixels


def prompts_of(value, row: int) -> list[str]:
    if value is None or isinstance(value, float) or isinstance(value, str | bytes):
        raise RequestError(f"row {row}: 'prompts' must be a list of phrases, e.g. [\"pleural effusion\"]")
    prompts = [str(p) for p in value]
    if not prompts or any(not p.strip() for p in prompts):
        raise RequestError(f"row {row}: give at least one non-empty prompt in 'prompts', e.g. "
                           "[\"pleural effusion\", \"no pleural effusion\"]")
    if len(prompts) > MAX_PROMPTS:
        raise RequestError(f"row {row}: {len(prompts)} prompts, over the limit of {MAX_PROMPTS}; split the request")
    return prompts


@torch.no_grad()
def answer(served: Served, image: np.ndarray, prompts: list[str] | None = None) -> dict:
    """One image's answer (JSON-ready)."""
    from g2d import inference
    from g2d.pipeline.zeroshot.similarity import to_model_input

    if served.needs_prompts:
        pred = inference.predict(image, prompts, model=served.model)
        return {"prompts": pred.prompts, "scores": pred.scores.tolist(), "heatmaps": pred.heatmaps.tolist()}
    net, config = served.model, served.config
    size = int(config["image_size"])
    x = to_model_input(image, size)
    h, w = image.shape
    if served.kind == "segmentation":
        prob = torch.sigmoid(net(x).float())
        prob = torch.nn.functional.interpolate(prob, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        return {"probability": prob.numpy().round(6).tolist(),
                "mask": (prob > float(config["threshold"])).to(torch.uint8).numpy().tolist(),
                "threshold": float(config["threshold"])}
    if served.kind == "classification":
        logits = net(x).float()[0]
        probs = torch.softmax(logits, 0) if config.get("multiclass") else torch.sigmoid(logits)
        return {"classes": list(config["classes"]), "probabilities": probs.numpy().tolist()}
    if served.kind == "detection":
        [found] = net.decode(net.encode(x))
        keep = found["labels"] > 0  # 0 is torchvision's background
        scale = torch.tensor([w / size, h / size, w / size, h / size])
        boxes = (found["boxes"][keep].float() * scale).numpy().round(2).tolist()
        labels = [config["classes"][int(k) - 1] for k in found["labels"][keep]]
        return {"boxes": boxes, "labels": labels, "scores": found["scores"][keep].float().numpy().tolist()}
    raise RequestError(f"{served.source}: a {served.kind} model, which g2d cannot serve")


def predict(served: Served, rows) -> list[dict]:
    """A request (a DataFrame with an 'image' column, and 'prompts' for an encoder) -> one answer per row."""
    columns = set(getattr(rows, "columns", []))
    need = {"image", "prompts"} if served.needs_prompts else {"image"}
    if not need <= columns:
        raise RequestError(f"the request has columns {sorted(columns)}; this {served.kind} model needs "
                           f"{sorted(need)}")
    if len(rows) == 0:
        raise RequestError("the request has no rows; send one row per image")
    out = []
    for i, row in enumerate(rows.to_dict("records")):
        prompts = prompts_of(row["prompts"], i) if served.needs_prompts else None
        out.append(answer(served, decode(row["image"], i), prompts))
    return out
