"""Figures a person would rather look at than read: the attention / pseudo-mask grid of pre-training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def attention_grid(images: torch.Tensor, attention: torch.Tensor, masks: torch.Tensor,
                   truth: torch.Tensor | None, ids: list[str], title: str, path: Path) -> Path:
    """One row per image: the image, the head-averaged attention over it, the pseudo mask, and the
    rendered finding masks when known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heat = F.interpolate(attention.float().mean(1, keepdim=True), size=images.shape[-2:], mode="bilinear",
                         align_corners=False)
    cols = 4 if truth is not None else 3
    fig, axes = plt.subplots(len(images), cols, figsize=(cols * 2.2, len(images) * 2.2), dpi=100, squeeze=False)
    for r in range(len(images)):
        img = images[r, 0].cpu().numpy()
        panels = [("image", img, None), ("attention", img, heat[r, 0].cpu().numpy()),
                  ("pseudo mask", img, masks[r, 0].cpu().numpy())]
        if truth is not None:
            panels.append(("rendered findings", img, truth[r, 0].cpu().numpy().astype(np.float32)))
        for c, (name, base, over) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(base, cmap="gray", vmin=0, vmax=1)
            if over is not None:
                if name == "attention":
                    ax.imshow(over, cmap="jet", alpha=0.45)
                else:
                    ax.imshow(np.ma.masked_where(over <= 0, over), cmap="autumn", alpha=0.55, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=8)
        axes[r][0].set_ylabel(ids[r], fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
