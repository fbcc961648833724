"""Labelled images for the downstream tasks: a manifest split read once into memory, at the training
size, with what the task needs (masks, boxes or label columns), and the label fraction of train.

The downstream sets are small (hundreds to a few thousand images at 128 px), so holding them as
tensors makes every fine-tuning step free of decoding and every run exactly repeatable.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from g2d.data import manifest as mf
from g2d.data.images import read_gray8
from g2d.data.splits import FRACTIONS_DIR
from g2d.data.tasks import TaskSpec
from g2d.errors import DataError


@dataclass
class Fraction:
    frac: float
    ids: list[str]
    sha256: str  # of the id list, one per line, as the data layer writes it
    source: str  # the fraction file, or how the subset was derived


@dataclass
class LabelledSplit:
    split: str
    ids: list[str]
    images: torch.Tensor  # (N, 1, S, S) float in [0, 1]
    masks: torch.Tensor | None = None  # (N, 1, S, S) bool, segmentation
    labels: torch.Tensor | None = None  # (N, C) float, NaN = uncertain or missing; classification
    boxes: list[torch.Tensor] | None = None  # per image (k, 4) x0 y0 x1 y1 in pixels of S; detection
    box_labels: list[torch.Tensor] | None = None  # per image (k,), class index from 1 (0 = background)
    dropped: dict[str, int] = field(default_factory=dict)  # what was left out, and why

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, ids: list[str]) -> LabelledSplit:
        """The rows of `ids`, in this split's order (a label fraction of a train split loaded once)."""
        wanted = set(ids)
        rows = [i for i, x in enumerate(self.ids) if x in wanted]
        if len(rows) != len(wanted):
            missing = sorted(wanted - set(self.ids))
            raise DataError(f"{len(missing)} id(s) are not in the loaded {self.split} split, e.g. {missing[:3]}")
        index = torch.tensor(rows, dtype=torch.long)

        def pick(x):
            return x[index.to(x.device)] if isinstance(x, torch.Tensor) else [x[i] for i in rows] if x else x

        return LabelledSplit(self.split, [self.ids[i] for i in rows], pick(self.images), pick(self.masks),
                             pick(self.labels), pick(self.boxes), pick(self.box_labels), self.dropped)

    def positions(self, ids: list[str]) -> torch.Tensor:
        """Row numbers of `ids` in this split."""
        at = {x: i for i, x in enumerate(self.ids)}
        return torch.tensor([at[x] for x in ids], dtype=torch.long)

    def to(self, device: torch.device) -> LabelledSplit:
        def move(x):
            return x.to(device) if isinstance(x, torch.Tensor) else [t.to(device) for t in x] if x else x

        return LabelledSplit(self.split, self.ids, move(self.images), move(self.masks), move(self.labels),
                             move(self.boxes), move(self.box_labels), self.dropped)


def _ids_sha256(ids: list[str]) -> str:
    return hashlib.sha256(("\n".join(ids) + "\n").encode()).hexdigest()


def fraction(folder: Path, df: pd.DataFrame, frac: float) -> Fraction:
    """The label fraction `frac` of the train split.

    A fraction the data layer wrote (fractions/train_<f>.txt) is read and checked against the hash in
    dataset.json. Any other fraction is the first floor(frac * n) ids of one fixed ranking that lists the
    written fractions from the smallest up (each tier in sha256-of-id order), so it nests with them."""
    if not 0 < frac <= 1:
        raise DataError(f"--frac {frac}: a label fraction must be in (0, 1]")
    train = sorted(df.loc[df["split"] == "train", "id"]) if "split" in df else []
    if not train:
        raise DataError(f"{folder / mf.MANIFEST}: no train rows; fine-tuning needs a split column with train rows")
    recorded = mf.read_info(folder).get("fractions", {})
    entry = recorded.get(f"{frac:g}")
    if entry:
        path = folder / entry["file"]
        if not path.is_file():
            raise DataError(f"{path}: fraction file missing; re-render or re-import the dataset")
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if entry.get("sha256") and digest != entry["sha256"]:
            raise DataError(f"{path}: sha256 {digest[:12]} differs from {entry['sha256'][:12]} in {mf.DATASET_INFO}; "
                            "the fraction was edited: re-render (`dvc repro synth`) or `dvc checkout`")
        ids = [line for line in data.decode().splitlines() if line]
        unknown = sorted(set(ids) - set(train))
        if unknown:
            raise DataError(f"{path}: {len(unknown)} ids are not train rows of {folder / mf.MANIFEST}, e.g. "
                            f"{unknown[:3]}")
        return Fraction(frac, ids, digest, str(Path(entry["file"])))
    ranking = _ranking(folder, recorded, train)
    n = math.floor(frac * len(train))
    if n == 0:
        raise DataError(f"--frac {frac}: {frac} x {len(train)} train rows of {folder / mf.MANIFEST} is an empty "
                        f"subset; the smallest usable fraction is {1 / len(train):.4g}")
    ids = sorted(ranking[:n])
    return Fraction(frac, ids, _ids_sha256(ids), f"first {n} of the nested ranking of {FRACTIONS_DIR}/")


def balanced(chosen: Fraction, train: LabelledSplit, seed: int) -> Fraction:
    """MGCA's SIIM train set: every image of the label fraction with a finding, plus as many images without one
    drawn with `seed` (all of them when there are fewer). Val and test are not touched: they keep the natural
    prevalence."""
    split = train.subset(chosen.ids)
    positive = split.masks.flatten(1).any(1).tolist()
    pos = [i for i, p in zip(split.ids, positive, strict=True) if p]
    neg = [i for i, p in zip(split.ids, positive, strict=True) if not p]
    if not pos:
        raise DataError(f"{chosen.source}: the {chosen.frac:g} label fraction of train ({len(neg)} images) has no "
                        "image with a finding, so a balanced train set is empty; use a larger --frac, or set "
                        "finetune.segmentation.balanced to [] to train on the fraction as it is")
    keep = np.random.default_rng(seed).choice(len(neg), size=min(len(pos), len(neg)), replace=False)
    ids = sorted(pos + [neg[i] for i in keep])
    return Fraction(chosen.frac, ids, _ids_sha256(ids),
                    f"{chosen.source}, balanced: its {len(pos)} images with a finding and {len(keep)} of its "
                    f"{len(neg)} without (seed {seed})")


def _ranking(folder: Path, recorded: dict, train: list[str]) -> list[str]:
    def key(i: str) -> str:
        return hashlib.sha256(i.encode()).hexdigest()

    tiers: list[list[str]] = []
    for name in sorted(recorded, key=float):
        path = folder / recorded[name]["file"]
        if path.is_file():
            tiers.append([line for line in path.read_text().splitlines() if line])
    tiers.append(train)
    in_train = set(train)
    seen: set[str] = set()
    ranking: list[str] = []
    for tier in tiers:
        new = sorted((i for i in set(tier) if i not in seen and i in in_train), key=key)
        seen.update(new)
        ranking += new
    return ranking


def open_resized(folder: Path, rel: str, where: str, size: int,
                 resample: Image.Resampling) -> tuple[np.ndarray, int, int]:
    """A manifest's image or mask as 8-bit size x size, with its size on disk (to scale boxes)."""
    path = mf.resolve(folder, rel, where)
    try:
        im = read_gray8(path)
    except (DataError, OSError) as e:
        raise DataError(f"{where}: {e}; `g2d data validate {folder}` lists every bad file") from None
    return np.asarray(im.resize((size, size), resample)), im.width, im.height


def load_split(folder: Path, df: pd.DataFrame, split: str, spec: TaskSpec, size: int,
               ids: list[str] | None = None, progress: Callable[[int], None] | None = None) -> LabelledSplit:
    """Rows of `split` (restricted to `ids` when given) with what `spec.kind` needs, resized to `size`."""
    rows = df[df["split"] == split] if "split" in df else df.iloc[:0]
    if ids is not None:
        rows = rows[rows["id"].isin(set(ids))]
    rows = rows.sort_values("id").reset_index(drop=True)
    where = str(folder / mf.MANIFEST)
    if rows.empty:
        raise DataError(f"{where}: no rows in split {split!r}")
    need = {"segmentation": ["mask"], "detection": ["boxes"], "classification": list(spec.labels)}[spec.kind]
    missing = [c for c in need if c not in rows.columns]
    if missing:
        raise DataError(f"{where}: task {spec.name!r} needs column(s) {missing}; columns are {list(df.columns)}")

    images = np.zeros((len(rows), size, size), dtype=np.uint8)
    masks = np.zeros((len(rows), size, size), dtype=bool) if spec.kind == "segmentation" else None
    boxes, box_labels, dropped = [], [], Counter()
    for i, row in rows.iterrows():
        at = f"{where} row {row['id']}"
        images[i], w, h = open_resized(folder, row["image"], at, size, Image.Resampling.BILINEAR)
        if masks is not None and row["mask"]:
            masks[i] = open_resized(folder, row["mask"], at, size, Image.Resampling.NEAREST)[0] > 0  # 0/1 or 0/255
        if spec.kind == "detection":
            b, lab = _boxes(row, spec, size / w, size / h, where, dropped)
            boxes.append(b)
            box_labels.append(lab)
        if progress:
            progress(1)
    out = LabelledSplit(split, list(rows["id"]), torch.from_numpy(images).float().div_(255).unsqueeze(1))
    if masks is not None:
        out.masks = torch.from_numpy(masks).unsqueeze(1)
    if spec.kind == "detection":
        out.boxes, out.box_labels = boxes, box_labels
    if spec.kind == "classification":
        out.labels = _labels(rows, spec, where, dropped)
    out.dropped = dict(dropped)
    return out


def _boxes(row: pd.Series, spec: TaskSpec, sx: float, sy: float, where: str, dropped: Counter):
    try:
        raw = json.loads(row["boxes"] or "[]")
    except json.JSONDecodeError as e:
        raise DataError(f"{where} row {row['id']}: boxes is not JSON ({e})") from None
    kept = []
    for box in raw:
        if len(box) != 5:
            raise DataError(f"{where} row {row['id']}: box {box} is not [x0, y0, x1, y1, label]")
        if box[4] not in spec.labels:
            dropped[f"boxes labelled {box[4]!r} (not a {spec.name} class)"] += 1
            continue
        x0, y0, x1, y1 = float(box[0]) * sx, float(box[1]) * sy, float(box[2]) * sx, float(box[3]) * sy
        if x1 - x0 < 1 or y1 - y0 < 1:
            dropped["boxes under one pixel at the training size"] += 1
            continue
        kept.append(([x0, y0, x1, y1], spec.labels.index(box[4]) + 1))
    b = torch.tensor([k[0] for k in kept], dtype=torch.float32).reshape(-1, 4)
    return b, torch.tensor([k[1] for k in kept], dtype=torch.int64)


def _labels(rows: pd.DataFrame, spec: TaskSpec, where: str, dropped: Counter) -> torch.Tensor:
    values = rows[list(spec.labels)].astype("float64").to_numpy()  # pandas NA -> nan
    uncertain = values == -1
    if uncertain.any():
        dropped["uncertain labels (-1), left out of loss and metrics"] = int(uncertain.sum())
    values[uncertain] = np.nan
    missing = np.isnan(values) & ~uncertain
    if spec.multiclass:  # one-of-K: a blank says "not this class" (CheXpert 5x200 leaves the other four blank)
        values[missing] = 0
        missing[:] = False
    if missing.any():
        dropped["missing labels, left out of loss and metrics"] = int(missing.sum())
    if spec.multiclass:
        bad = np.flatnonzero(np.isnan(values).any(axis=1) | (np.nansum(values, axis=1) != 1))
        if len(bad):
            raise DataError(f"{where}: task {spec.name!r} needs exactly one of {list(spec.labels)} = 1 per row; rows "
                            f"{list(rows['id'].iloc[bad[:5]])} do not (uncertain or missing values included)")
    return torch.from_numpy(values).float()
