"""Figures a person would rather look at than read: the attention / pseudo-mask grid of pre-training,
the prediction overlays of fine-tuning, the grounding report page and `g2d explain`'s heat maps."""

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


def pseudo_mask_curve(by_epoch: list[dict], title: str, path: Path) -> Path:
    """Pseudo-mask coverage, precision, IoU and the attention's pointing game over epochs (solid), each beside
    its chance value (dashed, same colour): whether the attention learns where the findings are."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    epochs = [row["epoch"] for row in by_epoch]
    for name, colour in zip(("coverage", "precision", "iou", "pointing"), ("C0", "C1", "C2", "C3"), strict=True):
        ax.plot(epochs, [row[name] for row in by_epoch], "o-", color=colour, label=name)
        ax.plot(epochs, [row[f"{name}_chance"] for row in by_epoch], "--", color=colour, alpha=0.7,
                label=f"{name}, chance")
    ax.set_xlabel("epoch")
    ax.set_ylabel("val images with a rendered finding (mean)")
    top = max(row[k] for row in by_epoch for k in row if k not in ("step", "epoch", "images"))
    ax.set_ylim(0, min(1.0, 1.35 * top + 0.02))  # room for the legend; precision's and pointing's chance coincide
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=4, loc="upper center")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


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


def _heat_panel(ax, image: np.ndarray, heat: np.ndarray, box=None, contours: bool = True) -> None:
    """The image, the [0, 1]-scaled heat map over it, its contours at 50 / 75 / 90 %, a truth box."""
    from matplotlib.patches import Rectangle

    ax.imshow(image, cmap="gray", vmin=0, vmax=1)
    ax.imshow(heat, cmap="jet", alpha=0.4, vmin=0, vmax=1)
    if contours and heat.max() > heat.min():
        ax.contour(heat, levels=[0.5, 0.75, 0.9], colors="white", linewidths=[0.5, 0.8, 1.1])
    if box is not None:
        x0, y0, x1, y1 = box
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="lime", lw=1.2))
    ax.set_xticks([])
    ax.set_yticks([])


def grounding_grid(images: torch.Tensor, heat01: torch.Tensor, truth: torch.Tensor, binary: torch.Tensor,
                   phrases: list[str], ids: list[str], hits: list[bool], title: str, path: Path) -> Path:
    """The grounding report page: per example the image, the phrase, its [0, 1]-scaled heat map, the truth
    (green outline), the binarised map (white outline) and the maximum (a cross: green on the truth, red off)."""
    import textwrap

    fig, axes = _grid(len(images), title)
    for i, ax in enumerate(axes[: len(images)]):
        h = heat01[i].float().cpu().numpy()
        _heat_panel(ax, images[i, 0].cpu().numpy(), h, contours=False)
        for mask, colour in ((truth[i], "lime"), (binary[i], "white")):
            m = mask.cpu().numpy().astype(np.float32)
            if 0 < m.sum() < m.size:
                ax.contour(m, levels=[0.5], colors=colour, linewidths=0.9)
        y, x = np.unravel_index(int(np.argmax(h)), h.shape)
        ax.plot(x, y, marker="x", color="lime" if hits[i] else "red", markersize=7, mew=2)
        ax.set_title(f"{ids[i]}\n" + "\n".join(textwrap.wrap(phrases[i], 30)), fontsize=6.5)
    save_figure(fig, path)
    from PIL import Image

    with Image.open(path) as page:  # 256 colours: a quarter of the bytes for a page that is committed
        page.convert("RGB").quantize(256).save(path, optimize=True)
    return path


def explain_figure(image: np.ndarray, heats: list[np.ndarray], prompts: list[str], scores: list[float],
                   box, title: str, path: Path) -> Path:
    """`g2d explain`: the image, then one heat map per prompt with its contours (and the truth box)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(heats) + 1
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.7), dpi=110, squeeze=False)
    axes = axes[0]
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("\n".join(textwrap.wrap(title, 40)), fontsize=7)
    axes[0].set_xticks([])
    axes[0].set_yticks([])
    for ax, heat, prompt, s in zip(axes[1:], heats, prompts, scores, strict=True):
        _heat_panel(ax, image, heat, box)
        ax.set_title("\n".join(textwrap.wrap(f"'{prompt}'", 36)) + f"\nimage-text similarity {s:.3f}", fontsize=8)
    return save_figure(fig, path)
