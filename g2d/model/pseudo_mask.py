"""The pseudo segmentation target (paper §3.2): built from the attention pooling's weights, with no
parameters and no gradient. Each step can be switched for the paper's ablations (Table 8).

    per-head attention of the query over the pixels
      -> mean over heads                       (aggregate_heads; off: the first head alone)
      -> upsample to the image size
      -> zero outside the body                 (body_mask: Otsu threshold of the image)
      -> 1 where above the per-image quantile  (threshold: 0.85 keeps the top 15% of the body)
      -> joint bilateral smoothing             (smooth: guided by the image, then re-binarised)
      -> optionally shuffled across the batch  (shuffle: the ablation that breaks the pairing)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from g2d.config import PseudoMask


def otsu_body_mask(images: torch.Tensor, bins: int = 64) -> torch.Tensor:
    """(B, 1, H, W) in [0, 1] -> bool body mask: pixels brighter than each image's Otsu threshold
    (the patient is denser than the air around them)."""
    b = images.shape[0]
    flat = images.reshape(b, -1).clamp(0, 1)
    idx = (flat * (bins - 1)).round().long()
    hist = torch.zeros(b, bins, device=images.device).scatter_add_(1, idx, torch.ones_like(flat))
    p = hist / hist.sum(1, keepdim=True)
    levels = torch.linspace(0, 1, bins, device=images.device)
    w0 = p.cumsum(1)
    mu = (p * levels).cumsum(1)
    between = (mu[:, -1:] * w0 - mu) ** 2 / (w0 * (1 - w0)).clamp_min(1e-12)
    last_background_bin = between.argmax(1, keepdim=True)  # bins up to here are background
    return (idx > last_background_bin).reshape(images.shape)


def quantile_binarise(values: torch.Tensor, inside: torch.Tensor, q: float) -> torch.Tensor:
    """1 where a pixel's value is above the q-quantile of the values inside `inside`, per image.
    (Per image, not one nanquantile over the batch: torch's quantile refuses inputs over 2^24 values.)"""
    flat, keep = values.reshape(values.shape[0], -1), inside.reshape(values.shape[0], -1)
    cuts = torch.stack([torch.quantile(v[k], q) if k.any() else v.max() for v, k in zip(flat, keep, strict=True)])
    return ((flat > cuts[:, None]) & keep).reshape(values.shape)


def bilateral_smooth(mask: torch.Tensor, guide: torch.Tensor, kernel: int, sigma_space: float,
                     sigma_range: float) -> torch.Tensor:
    """Joint bilateral filter of a binary mask guided by the image, re-binarised at 0.5: ragged
    edges follow the image's edges instead of the attention grid's blocks. One shifted view of the
    padded image and mask per window offset, accumulated in place (an unfold of the k*k neighbourhoods
    would copy both k*k times: 14x slower at 224 px)."""
    pad = kernel // 2
    h, w = mask.shape[-2:]
    g = F.pad(guide, (pad,) * 4, mode="replicate")
    m = F.pad(mask.float(), (pad,) * 4, mode="replicate")
    weighted, total = torch.zeros_like(guide), torch.zeros_like(guide)
    for dy in range(kernel):
        for dx in range(kernel):
            spatial = math.exp(-((dy - pad) ** 2 + (dx - pad) ** 2) / (2 * sigma_space**2))
            weight = (g[..., dy:dy + h, dx:dx + w] - guide).square_().mul_(-1 / (2 * sigma_range**2)).exp_()
            weight.mul_(spatial)
            total += weight
            weighted.addcmul_(weight, m[..., dy:dy + h, dx:dx + w])
    return weighted > 0.5 * total  # the weighted mean above 0.5 (total >= the centre's weight, 1)


def attention_map(attention: torch.Tensor, size: tuple[int, int], cfg: PseudoMask) -> torch.Tensor:
    """(B, heads, h, w) -> (B, 1, H, W): the heads' mean (or the first head), upsampled to the image."""
    attention = attention.detach().float()
    agg = attention.mean(1, keepdim=True) if cfg.aggregate_heads else attention[:, :1]
    return F.interpolate(agg, size=size, mode="bilinear", align_corners=False)


def body_region(images: torch.Tensor, cfg: PseudoMask) -> torch.Tensor:
    """Where a pseudo mask may lie: the body (Otsu) or, without body_mask, the whole image; a blank image
    keeps all its pixels."""
    inside = otsu_body_mask(images) if cfg.body_mask else torch.ones_like(images, dtype=torch.bool)
    return inside | ~inside.flatten(1).any(1).view(-1, 1, 1, 1)


@torch.no_grad()
def pseudo_mask(attention: torch.Tensor, images: torch.Tensor, cfg: PseudoMask,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """attention (B, heads, h, w) and images (B, 1, H, W) in [0, 1] -> float mask (B, 1, H, W) of 0 / 1."""
    up = attention_map(attention, images.shape[-2:], cfg)
    inside = body_region(images, cfg)
    q = 0.5 if cfg.threshold == "median" else float(cfg.threshold)
    mask = quantile_binarise(up * inside, inside, q)
    if cfg.smooth:
        mask = bilateral_smooth(mask, images.float(), cfg.smooth_kernel, cfg.smooth_sigma_space,
                                cfg.smooth_sigma_range) & inside
    if cfg.shuffle and mask.shape[0] > 1:  # every image gets another image's mask, never its own
        b = mask.shape[0]
        shift = int(torch.randint(1, b, (1,), generator=generator))
        mask = mask[(torch.arange(b) + shift) % b]
    return mask.float()
