"""MGCA's train augmentation for segmentation (albumentations' ShiftScaleRotate: shift 6.25%, scale 10%,
rotation 10 degrees, reflected borders, probability 0.5), as MONAI's RandAffined so an image and its mask move
together (bilinear for the image, nearest for the mask).

Two ways to draw it, because a frozen encoder's features are cached (g2d/pipeline/finetune/features.py):
`views` draws K transformed copies of every train image once, each seeded by (seed, view, image id) so a copy
never depends on which other images were loaded; `Fresh` transforms every batch anew, as MGCA does."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from g2d.config import Augment


def _transform(cfg: Augment, size: int, prob: float):
    from monai.transforms import RandAffined

    return RandAffined(keys=("image", "mask"), prob=prob, rotate_range=np.deg2rad(cfg.rotate),
                       translate_range=(cfg.shift * size, cfg.shift * size), scale_range=(cfg.scale, cfg.scale),
                       mode=("bilinear", "nearest"), padding_mode="reflection")


def _apply(transform, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = transform({"image": image, "mask": mask.float()})
    plain = [x.as_tensor() if hasattr(x, "as_tensor") else x for x in (out["image"], out["mask"])]  # MetaTensor
    return plain[0].clamp_(0, 1), plain[1] > 0.5


def views(cfg: Augment, images: torch.Tensor, masks: torch.Tensor, ids: list[str], seed: int
          ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`cfg.views` transformed copies (images, masks) of the split, every copy transformed."""
    transform = _transform(cfg, images.shape[-1], prob=1.0)
    out = []
    for view in range(cfg.views or 0):
        im, mk = torch.empty_like(images), torch.empty_like(masks)
        for i, name in enumerate(ids):
            key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
            transform.set_random_state(seed=int(np.random.SeedSequence([seed, view, key]).generate_state(1)[0]))
            im[i], mk[i] = _apply(transform, images[i], masks[i])
        out.append((im, mk))
    return out


class Fresh:
    """Each batch transformed anew (every image with probability p), seeded once per run."""

    def __init__(self, cfg: Augment, size: int, seed: int) -> None:
        self.transform = _transform(cfg, size, prob=cfg.p)
        self.transform.set_random_state(seed=seed)

    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [_apply(self.transform, x, m) for x, m in zip(images.cpu(), masks.cpu(), strict=True)]
        return (torch.stack([p[0] for p in pairs]).to(images.device),
                torch.stack([p[1] for p in pairs]).to(masks.device))
