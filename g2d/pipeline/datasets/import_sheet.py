"""The contact sheet of an imported dataset: stored images with their masks, boxes and phrases drawn, so a
person sees at a glance that annotations landed on the right pixels (orientation, scaling, inversion)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from g2d.data import manifest as mf

COLUMNS_OF_SHEET = 6


def pick(df: pd.DataFrame, n: int) -> pd.DataFrame:
    """Annotated rows first (a mask, boxes, phrases or a finding label), then the others; in id order, spread
    over the dataset so one shard does not fill the page."""
    labels = [c for c in mf.label_columns(df) if mf.names_a_finding(c)]
    annotated = pd.Series(False, index=df.index)
    for col in ("boxes", "findings"):
        if col in df:
            annotated |= df[col].fillna("").str.len() > 2
    if labels:
        annotated |= df[labels].eq(1).any(axis=1)
    want_pos = n - n // 3
    pos, neg = df[annotated], df[~annotated]
    take_pos = pos.iloc[np.linspace(0, len(pos) - 1, min(want_pos, len(pos))).round().astype(int)] if len(pos) else pos
    rest = n - len(take_pos)
    take_neg = neg.iloc[np.linspace(0, len(neg) - 1, min(rest, len(neg))).round().astype(int)] if len(neg) else neg
    return pd.concat([take_pos, take_neg]).drop_duplicates("id")


def write(folder: Path, path: Path, n: int = 12, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    df = mf.read_manifest(folder)
    rows = pick(df, n)
    labels = [c for c in mf.label_columns(df) if mf.names_a_finding(c)]
    cols = min(COLUMNS_OF_SHEET, max(1, len(rows)))
    grid = (len(rows) + cols - 1) // cols
    fig, axes = plt.subplots(grid, cols, figsize=(cols * 2.4, grid * 2.9), dpi=110, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (_, row) in zip(axes.ravel(), rows.iterrows(), strict=False):
        image = np.asarray(Image.open(mf.resolve(folder, row["image"], "image")))
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        if row.get("mask"):
            mask = np.asarray(Image.open(mf.resolve(folder, row["mask"], "mask"))) > 0
            if mask.any():
                ax.contour(mask, levels=[0.5], colors=["#00f5d4"], linewidths=0.8)
        for box in json.loads(row.get("boxes") or "[]"):
            x0, y0, x1, y1, label = box[:5]
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="#ff9f1c", lw=0.7))
            ax.text(x0, max(y0 - 2, 6), str(label), color="#ff9f1c", fontsize=5, va="bottom")
        phrases = sorted({f.get("phrase", "") for f in json.loads(row.get("findings") or "[]")} - {""})
        positive = [c for c in labels if (row[c] == 1) is True]  # blank (NA) is not positive
        caption = "; ".join(phrases) or ", ".join(positive) or "no finding labelled"
        ax.set_title(f"{row['id'][:24]} ({row.get('split', '')})\n" + textwrap.shorten(caption, 60), fontsize=5.5)
    fig.suptitle(title or f"{folder.name}: stored images, masks (cyan) and boxes (orange)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
