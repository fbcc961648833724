"""SIIM-ACR pneumothorax as Kaggle distributes it: train-rle.csv (" EncodedPixels" with a leading space,
"-1" = empty, several rows per image) and dicom-images-train/<study>/<series>/<ImageId>.dcm."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.layouts import radiograph, write_dicom


def encode_rle(mask: np.ndarray) -> str:
    """bool (H, W) -> SIIM's relative-offset RLE over the column-major flattening."""
    flat = mask.T.ravel().astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [0]])))
    starts, ends = edges[0::2], edges[1::2]
    out, pos = [], 0
    for s, e in zip(starts, ends, strict=True):
        out += [int(s - pos), int(e - s)]
        pos = e
    return " ".join(map(str, out)) if out else "-1"


def build(root: Path, n: int = 12, size: int = 64, missing: int = 0) -> dict:
    """n images (every third with two pneumothorax rows, every third empty); `missing` listed ids without a
    DICOM. The RLE is on size x size (SIIM's is 1024; the importer takes the size from the DICOM)."""
    lines = ["ImageId, EncodedPixels"]
    truth = {}
    for i in range(n + missing):
        image_id = f"1.2.276.0.7230010.3.1.4.8323329.{1000 + i}.1517875{i:03d}.1"
        mask = np.zeros((size, size), dtype=bool)
        if i % 3 == 0:
            lines.append(f"{image_id},-1")
        else:
            first = np.zeros_like(mask)
            first[5 + i:20 + i, 4:14] = True
            lines.append(f"{image_id}, {encode_rle(first)}")
            mask |= first
            if i % 3 == 2:
                second = np.zeros_like(mask)
                second[30:40, 40:60] = True
                lines.append(f"{image_id}, {encode_rle(second)}")
                mask |= second
        if i < n:
            study, series = f"1.2.276.0.7230010.3.1.2.{i}", f"1.2.276.0.7230010.3.1.3.{i}"
            write_dicom(root / "dicom-images-train" / study / series / f"{image_id}.dcm",
                        radiograph(size, size, seed=i), photometric="MONOCHROME1" if i == 1 else "MONOCHROME2",
                        PatientID=f"patient-{i // 2}")
        truth[image_id] = mask
    (root / "train-rle.csv").write_text("\n".join(lines) + "\n")
    return truth
