"""What pre-training is checked by: zero-shot image-report retrieval on val, and how well the
pseudo masks cover the rendered findings of SynthCXR (no published implementation reports this)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from g2d.config import PseudoMask
from g2d.model.pseudo_mask import attention_map, body_region, pseudo_mask


def recall_at_k(similarity: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Row i's match is column i. R@k both ways: image->text (rows) and text->image (columns)."""
    n = similarity.shape[0]
    target = torch.arange(n)
    out = {}
    for name, sim in (("i2t", similarity), ("t2i", similarity.T)):
        # ties count against the model: a collapsed model (all scores equal) must score 0, and a
        # report identical to the true one is no evidence the model found the right pair
        rank = (sim >= sim[target, target].unsqueeze(1)).sum(1) - 1
        for k in ks:
            out[f"{name}_R@{k}"] = float((rank < k).float().mean())
    return out


@torch.no_grad()
def embed_all(model, loader, dev) -> tuple[torch.Tensor, torch.Tensor]:
    images, texts = [], []
    for batch in loader:
        image = model.encode_image(batch["image"].to(dev))
        images.append(F.normalize(image.embedding.float(), dim=-1).cpu())
        texts.append(F.normalize(model.encode_text(batch["input_ids"].to(dev), batch["attention_mask"].to(dev))
                                 .float(), dim=-1).cpu())
    return torch.cat(images), torch.cat(texts)


@torch.no_grad()
def pseudo_mask_quality(model, loader, cfg: PseudoMask, dev) -> dict:
    """How well the pseudo masks (and the attention they come from) find the rendered findings of val images
    that have one, each score beside its chance value, overall (`all`: the union of an image's findings) and
    per finding kind (`by_kind`), as means over images:

    - coverage: the share of finding pixels inside the mask; precision: the share of mask pixels on a finding;
      IoU. Chance: a random mask of the same area inside the body (the same region the pseudo mask is drawn
      from): coverage a * |F in body| / (body * |F|), precision |F in body| / body, IoU from the expected
      overlap.
    - pointing: whether the maximum of the (head-averaged, upsampled) attention inside the body falls on a
      finding; chance: a random point of the body, |F in body| / body.
    """
    cfg = cfg.model_copy(update={"shuffle": False})
    rows: dict[str, list[dict[str, float]]] = {}
    unseen: dict[str, int] = {}
    for batch in loader:
        has = batch["mask"].flatten(1).any(1)
        if not has.any():
            continue
        images = batch["image"].to(dev)
        attention = model.encode_image(images).attention
        masks = pseudo_mask(attention, images, cfg).bool().cpu()
        body = body_region(images, cfg).cpu()
        peaks = attention_map(attention, images.shape[-2:], cfg).cpu().masked_fill(~body, -math.inf).flatten(1)
        peaks = peaks.argmax(1)
        for i in torch.nonzero(has).flatten().tolist():
            kinds = {"all": batch["mask"][i], **batch.get("finding_masks", [{}] * len(has))[i]}
            for kind, truth in kinds.items():
                if not truth.any():  # drawn, but under a pixel at this size: counted, not scored
                    unseen[kind] = unseen.get(kind, 0) + 1
                    continue
                rows.setdefault(kind, []).append(_scores(masks[i], body[i], int(peaks[i]), truth.bool()))
    if not rows:
        return {"images": 0}
    summary = {kind: {"images": len(r), **{k: sum(x[k] for x in r) / len(r) for k in r[0]}}
               for kind, r in sorted(rows.items())}
    return {**summary.pop("all"), "by_kind": summary, **({"unseen": unseen} if unseen else {})}


def _scores(mask: torch.Tensor, body: torch.Tensor, peak: int, truth: torch.Tensor) -> dict[str, float]:
    a, b, f = float(mask.sum()), float(body.sum()), float(truth.sum())
    f_body, hit = float((truth & body).sum()), float((mask & truth).sum())
    expected_hit = a * f_body / b
    return {"coverage": hit / f, "coverage_chance": expected_hit / f,
            "precision": hit / a if a else 0.0, "precision_chance": f_body / b,
            "iou": hit / (a + f - hit), "iou_chance": expected_hit / (a + f - expected_hit),
            "pointing": float(truth.flatten()[peak]), "pointing_chance": f_body / b}


def overall(quality: dict) -> dict[str, float]:
    """The scores over every finding (and their chance values, the image count), without the per-kind parts."""
    return {k: v for k, v in quality.items() if k not in ("by_kind", "unseen")}


def flat_quality(quality: dict, prefix: str = "val/pseudo_mask/") -> dict[str, float]:
    """The overall scores and chance values, and each kind's coverage and pointing, as MLflow metric names."""
    out = {f"{prefix}{k}": v for k, v in overall(quality).items()}
    for kind, q in quality.get("by_kind", {}).items():
        out |= {f"{prefix}{kind}/{k}": q[k] for k in ("coverage", "pointing")}
    return out
