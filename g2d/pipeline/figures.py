"""Figures a person would rather look at than read: the attention / pseudo-mask grid of pre-training and
the prediction overlays of fine-tuning."""

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
    return save_figure(fig, path)


def _grid(n: int, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 2.9), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    return fig, list(axes.flat)


def save_figure(fig, path: Path) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def segmentation_grid(images: torch.Tensor, truth: torch.Tensor, pred: torch.Tensor, ids: list[str],
                      captions: list[str], title: str, path: Path) -> Path:
    """Each image with its truth outlined in green and the prediction filled in yellow."""
    fig, axes = _grid(len(images), title + "  (green: truth outline, yellow: prediction)")
    for i, ax in enumerate(axes[: len(images)]):
        ax.imshow(images[i, 0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        p = pred[i, 0].cpu().numpy().astype(np.float32)
        ax.imshow(np.ma.masked_where(p <= 0, p), cmap="autumn", alpha=0.45, vmin=0, vmax=1)
        t = truth[i, 0].cpu().numpy().astype(np.float32)
        if t.any():
            ax.contour(t, levels=[0.5], colors="lime", linewidths=0.8)
        ax.set_title(f"{ids[i]}\n{captions[i]}", fontsize=7)
    return save_figure(fig, path)


def detection_grid(images: torch.Tensor, truth: list[torch.Tensor], predictions: list[dict], ids: list[str],
                   title: str, path: Path, top: int = 3) -> Path:
    """Truth boxes in green, the `top` highest-scoring detections in red with their scores."""
    from matplotlib.patches import Rectangle

    fig, axes = _grid(len(images), title + "  (green: truth, red: top detections)")
    for i, ax in enumerate(axes[: len(images)]):
        ax.imshow(images[i, 0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        for x0, y0, x1, y1 in truth[i].tolist():
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="lime", lw=1))
        order = predictions[i]["scores"].argsort(descending=True)[:top]
        for j in order.tolist():
            x0, y0, x1, y1 = predictions[i]["boxes"][j].tolist()
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="red", lw=1))
            ax.text(x0, y0, f"{float(predictions[i]['scores'][j]):.2f}", color="red", fontsize=6)
        ax.set_title(ids[i], fontsize=7)
    return save_figure(fig, path)


def labelled_grid(images: torch.Tensor, ids: list[str], captions: list[str], title: str, path: Path) -> Path:
    """Images with a caption each (classification: truth and the top predicted labels)."""
    fig, axes = _grid(len(images), title)
    for i, ax in enumerate(axes[: len(images)]):
        ax.imshow(images[i, 0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{ids[i]}\n{captions[i]}", fontsize=6)
    return save_figure(fig, path)
