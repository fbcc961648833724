"""What pre-training is checked by: zero-shot image-report retrieval on val, and how well the
pseudo masks cover the rendered findings of SynthCXR (no published implementation reports this)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from g2d.config import PseudoMask
from g2d.model.pseudo_mask import pseudo_mask


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
def pseudo_mask_quality(model, loader, cfg: PseudoMask, dev) -> dict[str, float]:
    """Over val images that have a rendered finding: IoU of pseudo mask and finding masks, and the
    share of finding pixels the pseudo mask covers. A random top-15% mask scores the finding area's
    share of the body; the figures should rise above that as the attention learns where to look."""
    inter = union = covered = truth = 0.0
    ious, n = [], 0
    for batch in loader:
        has = batch["mask"].flatten(1).any(1)
        if not has.any():
            continue
        image = model.encode_image(batch["image"].to(dev))
        masks = pseudo_mask(image.attention, batch["image"].to(dev), cfg.model_copy(update={"shuffle": False}))
        masks = masks.cpu().bool()[has]
        true = batch["mask"][has]
        i = (masks & true).flatten(1).sum(1).float()
        u = (masks | true).flatten(1).sum(1).float()
        ious.append(i / u.clamp_min(1))
        inter, union = inter + float(i.sum()), union + float(u.sum())
        covered, truth = covered + float(i.sum()), truth + float(true.flatten(1).sum())
        n += int(has.sum())
    if not n:
        return {"pseudo_mask_images": 0}
    return {"pseudo_mask_iou": float(torch.cat(ious).mean()), "pseudo_mask_iou_pooled": inter / max(union, 1.0),
            "pseudo_mask_recall": covered / max(truth, 1.0), "pseudo_mask_images": n}
