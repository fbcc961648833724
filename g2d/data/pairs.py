"""Image-report pairs for pre-training, as a torch Dataset over a manifest split.

Images are read from the manifest's folder and resized to the training size; training images get a
light, seeded augmentation (random resized crop, small rotation) whose randomness depends only on
(seed, epoch, row), so a run is reproducible whatever the number of workers. Tokenisation happens
in the collate function, i.e. in the dataloader workers, with padding to the batch's longest report.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from g2d.data import manifest as mf
from g2d.errors import DataError


class PairDataset(Dataset):
    def __init__(self, folder: Path, split: str | None, size: int, augment: bool = False, seed: int = 0,
                 ids: set[str] | None = None, with_masks: bool = False) -> None:
        self.folder = Path(folder)
        df = mf.read_manifest(self.folder)
        if "report" not in df.columns:
            raise DataError(f"{self.folder / mf.MANIFEST}: no 'report' column; pre-training needs image-report pairs")
        if split is not None:
            df = df[df["split"] == split]
        if ids is not None:
            df = df[df["id"].isin(ids)]
        if df.empty:
            raise DataError(f"{self.folder / mf.MANIFEST}: no rows in split {split!r}")
        self.rows = df.reset_index(drop=True)
        self.size, self.augment, self.seed, self.with_masks = size, augment, seed, with_masks
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _load(self, rel: str, resample: Image.Resampling) -> Image.Image:
        path = mf.resolve(self.folder, rel, f"{self.folder / mf.MANIFEST}")
        try:
            with Image.open(path) as im:
                return im.convert("L").resize((self.size, self.size), resample)
        except OSError as e:
            raise DataError(f"{path}: cannot read image ({e}); run `g2d data validate {self.folder}`") from None

    def _augment(self, image: Image.Image, mask: Image.Image | None, index: int):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        scale = rng.uniform(0.85, 1.0)
        side = int(round(self.size * scale))
        x0, y0 = (int(v) for v in rng.integers(0, self.size - side + 1, size=2))
        angle = float(rng.uniform(-7, 7))

        def apply(im: Image.Image, resample: Image.Resampling) -> Image.Image:
            im = im.crop((x0, y0, x0 + side, y0 + side)).resize((self.size, self.size), resample)
            return im.rotate(angle, resample=resample)

        return apply(image, Image.Resampling.BILINEAR), apply(mask, Image.Resampling.NEAREST) if mask else None

    def finding_mask(self, row: pd.Series) -> Image.Image:
        """Union of the row's rendered finding masks (SynthCXR), for scoring pseudo masks."""
        union = np.zeros((self.size, self.size), dtype=bool)
        for f in json.loads(row.get("findings") or "[]"):
            if f.get("mask"):
                union |= np.asarray(self._load(f["mask"], Image.Resampling.NEAREST)) > 127
        return Image.fromarray(union.astype(np.uint8) * 255)

    def __getitem__(self, index: int) -> dict:
        row = self.rows.iloc[index]
        image = self._load(row["image"], Image.Resampling.BILINEAR)
        mask = self.finding_mask(row) if self.with_masks else None
        if self.augment:
            image, mask = self._augment(image, mask, index)
        item = {"index": index, "id": row["id"], "report": row["report"],
                "image": torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]}
        if mask is not None:
            item["mask"] = torch.from_numpy(np.asarray(mask) > 127)[None]
        return item


class Collate:
    """Stack images and tokenise reports with padding to the longest in the batch (picklable, so
    it runs in the workers)."""

    def __init__(self, tokenizer, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, items: list[dict]) -> dict:
        tokens = self.tokenizer([it["report"] for it in items], padding="longest", truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        batch = {"image": torch.stack([it["image"] for it in items]), "input_ids": tokens["input_ids"],
                 "attention_mask": tokens["attention_mask"], "id": [it["id"] for it in items],
                 "index": torch.tensor([it["index"] for it in items])}
        if "mask" in items[0]:
            batch["mask"] = torch.stack([it["mask"] for it in items])
        return batch


def seed_worker(worker_id: int) -> None:
    """Dataloader workers: numpy and random seeded from torch's per-worker seed."""
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
