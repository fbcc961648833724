"""What a pre-trained G2D model says about an image and a piece of text, in its shared space.

- Zero-shot classification compares the *global* image embedding (the attention-pooled one InfoNCE
  trained) with a positive and a negative prompt per class, as in the paper's Table 2a.
- Grounding compares the prompt with every location of the last feature map and upsamples the cosine
  similarities to the image size: a heat map per prompt. A location enters the shared space the way
  the pooling would carry it (`AttentionPool.local_embeddings`: P_v of C5 plus its position, through
  the pooling's value and output projections). P_v's raw output is not in the shared space: on the
  default SynthCXR run its maximum lands inside the finding for 0 of 784 phrases (through the
  pooling's projections: 84, chance 35).

Prompts are built from templates with a `{finding}` slot; with `ensemble`, every template is embedded
and the class prompt is their normalised mean (CLIP's prompt ensembling).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from g2d.config import FINDING, Zeroshot


def phrase(name: str, cfg: Zeroshot) -> str:
    """The words for a label column or finding kind: `zeroshot.phrases`, else the name with spaces."""
    return cfg.phrases.get(name, name.replace("_", " "))


def finding_phrase(finding: dict, cfg: Zeroshot) -> str:
    """A grounding phrase for a rendered SynthCXR finding, e.g. 'lung opacity in the left lower lung'."""
    words = phrase(finding["kind"], cfg)
    side, zone = finding.get("side"), finding.get("zone")
    if finding["kind"] == "cardiomegaly" or not side:
        return words
    if side == "bilateral":
        return f"bilateral {words}" + ("" if zone in (None, "diffuse") else f" in the {zone} lungs")
    return f"{words} in the {side} {zone} lung" if zone not in (None, "diffuse") else f"{words} in the {side} lung"


@dataclass(frozen=True)
class ClassPrompts:
    name: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]


def class_prompts(classes: list[str], cfg: Zeroshot) -> list[ClassPrompts]:
    """'<finding>' vs 'no <finding>' per class, every template (or only the first without ensemble)."""
    take = slice(None) if cfg.ensemble else slice(1)

    def fill(templates: tuple[str, ...], words: str) -> tuple[str, ...]:
        return tuple(t.replace(FINDING, words) for t in templates[take])

    return [ClassPrompts(c, fill(cfg.positive, phrase(c, cfg)), fill(cfg.negative, phrase(c, cfg))) for c in classes]


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """(N, d) unit-norm projected [CLS] embeddings."""
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[i:i + batch_size], padding="longest", truncation=True,
                           max_length=model.cfg.max_length, return_tensors="pt")
        out.append(F.normalize(model.encode_text(tokens["input_ids"].to(dev), tokens["attention_mask"].to(dev))
                               .float(), dim=-1).cpu())
    return torch.cat(out)


def ensemble(embeddings: torch.Tensor) -> torch.Tensor:
    """The normalised mean of unit vectors (K, d) -> (d,)."""
    return F.normalize(embeddings.mean(0), dim=-1)


@torch.no_grad()
def embed_class_prompts(model, tokenizer, prompts: list[ClassPrompts]) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, d) positive and (C, d) negative class embeddings."""
    pos = [ensemble(embed_texts(model, tokenizer, list(p.positive))) for p in prompts]
    neg = [ensemble(embed_texts(model, tokenizer, list(p.negative))) for p in prompts]
    return torch.stack(pos), torch.stack(neg)


@dataclass
class ImageEmbeddings:
    pooled: torch.Tensor  # (N, d) unit-norm global embeddings
    maps: torch.Tensor | None  # (N, d, h, w) unit-norm per-location embeddings in the shared space


@torch.no_grad()
def embed_images(model, images: torch.Tensor, batch_size: int = 64, maps: bool = True) -> ImageEmbeddings:
    """Images (N, 1, S, S) in [0, 1] at the model's size; `maps=False` keeps only the pooled embeddings
    (zero-shot classification of a large test set need not hold N x d x h x w floats)."""
    dev = next(model.parameters()).device
    pooled, local = [], []
    for i in range(0, len(images), batch_size):
        out = model.encode_image(images[i:i + batch_size].to(dev))
        pooled.append(F.normalize(out.embedding.float(), dim=-1).cpu())
        if maps:
            local.append(F.normalize(model.pool.local_embeddings(out.projected_map).float(), dim=1).cpu())
    return ImageEmbeddings(torch.cat(pooled), torch.cat(local) if maps else None)


def similarity_maps(maps: torch.Tensor, texts: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Cosine similarity of each text (P, d) with every location of each map (N, d, h, w), bilinearly
    upsampled to `size`: (N, P, H, W), values in [-1, 1]."""
    sim = torch.einsum("ndhw,pd->nphw", maps, texts)
    return F.interpolate(sim, size=size, mode="bilinear", align_corners=False)


def to_model_input(image: np.ndarray, size: int) -> torch.Tensor:
    """A [0, 1] gray image at any size -> (1, 1, size, size), resized the way training resized (8-bit,
    bilinear), so a PNG gives exactly what the model saw in training."""
    pixels = np.clip(np.round(np.asarray(image, dtype=np.float64) * 255), 0, 255).astype(np.uint8)
    resized = Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)[None, None]


def scale01(heat: torch.Tensor) -> torch.Tensor:
    """Each map (..., H, W) min-max scaled to [0, 1] (a constant map becomes 0)."""
    flat = heat.flatten(-2)
    lo, hi = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).reshape(heat.shape)
