"""Contact sheets: a page of rendered examples beside their reports, finding outlines and boxes,
so a person can check at a glance that findings sit where the text says they are."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from g2d.data import manifest as mf

COLORS = {"opacity": "#ff9f1c", "consolidation": "#ff5e5b", "atelectasis": "#c77dff", "effusion": "#4cc9f0",
          "cardiomegaly": "#f72585", "nodule": "#80ed99", "granuloma": "#b5e48c", "pneumothorax": "#00f5d4",
          "emphysema": "#fee440", "edema": "#9b5de5", "device": "#f15bb5", "scar": "#adb5bd"}


def pick_examples(df: pd.DataFrame, n: int) -> pd.DataFrame:
    """A deterministic, varied pick: one row per kind of finding first, then normals, then the rest."""
    picked: list[int] = []
    kinds_seen: set[str] = set()
    findings = [json.loads(c or "[]") for c in df.get("findings", pd.Series([""] * len(df), index=df.index))]
    for i, fs in zip(df.index, findings, strict=True):
        new = {f["kind"] for f in fs} - kinds_seen
        if new and len(picked) < n - 1:
            picked.append(i)
            kinds_seen |= new
    for i, fs in zip(df.index, findings, strict=True):
        if len(picked) >= n:
            break
        if not fs and i not in picked:
            picked.append(i)
            break
    for i in df.index:
        if len(picked) >= n:
            break
        if i not in picked:
            picked.append(i)
    return df.loc[picked]


def _draw(ax, folder: Path, row: pd.Series) -> None:
    from matplotlib.patches import Rectangle

    image = np.asarray(Image.open(mf.resolve(folder, row["image"], "image")))
    ax.imshow(image, cmap="gray", vmin=0, vmax=255)
    size = image.shape[0]
    for f in json.loads(row.get("findings") or "[]"):
        color = COLORS.get(f["kind"], "white")
        if f.get("mask"):
            mask = np.asarray(Image.open(mf.resolve(folder, f["mask"], "mask"))) > 0
            ax.contour(mask, levels=[0.5], colors=[color], linewidths=0.8)
        x0, y0, x1, y1 = f["box"]
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=color, lw=0.6, ls="--"))
        ax.text(x0, max(y0 - 2, 6), f"{f['kind']} ({f['side']})", color=color, fontsize=5.5, va="bottom")
    if row.get("mask"):  # segmentation truth
        mask = np.asarray(Image.open(mf.resolve(folder, row["mask"], "mask"))) > 0
        if mask.any():
            ax.contour(mask, levels=[0.5], colors=["#00f5d4"], linewidths=0.8)
    ax.text(3, 3, "R", color="white", fontsize=7, va="top", ha="left", weight="bold")
    ax.text(size - 3, 3, "L", color="white", fontsize=7, va="top", ha="right", weight="bold")
    ax.set_xticks([])
    ax.set_yticks([])


def write_pretrain_sheet(folder: Path, path: Path, n: int) -> Path:
    """Images with finding outlines (colour per kind), and the paired report text below each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pick_examples(mf.read_manifest(folder), n)
    cols = min(4, len(df))
    rows = -(-len(df) // cols)
    fig = plt.figure(figsize=(cols * 3.4, rows * 5.2 + 0.8), dpi=110)
    top = 1 - 0.8 / (rows * 5.2 + 0.8)  # room for the title
    for k, (_, row) in enumerate(df.iterrows()):
        ax = fig.add_axes([(k % cols) / cols + 0.01, top * (1 - (k // cols + 0.62) / rows), 0.98 / cols,
                           top * 0.6 / rows])
        _draw(ax, folder, row)
        ax.set_title(row["id"], fontsize=7)
        text = textwrap.fill(textwrap.shorten(row["report"], 420, placeholder=" ..."), 62)
        terms = "; ".join(f["term"] for f in json.loads(row.get("findings") or "[]")) or "no drawn finding"
        fig.text((k % cols) / cols + 0.01, top * (1 - (k // cols + 0.64) / rows),
                 f"MeSH: {textwrap.fill(terms, 60)}\n\n{text}", fontsize=5.6, va="top", family="monospace")
    fig.suptitle("SynthCXR pre-training set: rendered findings (outlines, boxes) vs. the paired IU report "
                 "(R = patient's right)", fontsize=9, y=0.995, va="top")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_segmentation_sheet(folders: dict[str, Path], path: Path, per_set: int = 6) -> Path:
    """Positives and negatives of each segmentation set with the truth mask outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(folders), per_set, figsize=(per_set * 2.2, len(folders) * 2.5), dpi=110,
                             squeeze=False)
    for r, (name, folder) in enumerate(folders.items()):
        df = mf.read_manifest(folder)
        label = name if name in df.columns else mf.label_columns(df)[0]
        pos = df[df[label] == 1].head(per_set - per_set // 3)
        neg = df[df[label] == 0].head(per_set - len(pos))
        for c, (_, row) in enumerate(pd.concat([pos, neg]).iterrows()):
            _draw(axes[r][c], folder, row)
            axes[r][c].set_title(f"{name}: {row['id']} ({'pos' if row[label] == 1 else 'neg'})", fontsize=6)
    fig.suptitle("SynthCXR segmentation sets: truth outlined", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
