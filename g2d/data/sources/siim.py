"""SIIM-ACR pneumothorax masks: `train-rle.csv` as distributed.

Quirks of the official file, all handled here: the mask column is " EncodedPixels" with a
leading space; "-1" means an empty mask; an image with several pneumothoraces has several rows
(merged); the run-length encoding is relative (each start is an offset from the end of the
previous run) over the 1024 x 1024 image in column-major order.
"""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

import numpy as np

from g2d.errors import DataError

SIIM_SIZE = 1024


def decode_rle(rle: str, height: int = SIIM_SIZE, width: int = SIIM_SIZE, where: str = "rle") -> np.ndarray:
    """Relative-offset, column-major RLE -> bool (height, width). '-1' or '' -> empty."""
    flat = np.zeros(height * width, dtype=bool)
    rle = rle.strip()
    if rle in ("", "-1"):
        return flat.reshape(width, height).T
    try:
        nums = np.asarray([int(x) for x in rle.split()], dtype=np.int64)
    except ValueError:
        raise DataError(f"{where}: EncodedPixels is not a list of integers") from None
    if nums.size % 2:
        raise DataError(f"{where}: EncodedPixels has an odd number of values ({nums.size})")
    pos = 0
    for offset, length in zip(nums[0::2], nums[1::2], strict=True):
        start = pos + int(offset)
        end = start + int(length)
        if offset < 0 or length < 0 or end > flat.size:
            raise DataError(f"{where}: run ({offset}, {length}) leaves the {height}x{width} image")
        flat[start:end] = True
        pos = end
    return flat.reshape(width, height).T


def read_rle_table(path: Path) -> dict[str, list[str]]:
    """ImageId -> the RLE strings of its rows ('-1' rows kept, so negatives are listed too)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            text = io.TextIOWrapper(f, encoding="utf-8")
            reader = csv.DictReader(text, skipinitialspace=True)
            fields = [c.strip() for c in (reader.fieldnames or [])]
            if "ImageId" not in fields or "EncodedPixels" not in fields:
                raise DataError(f"{path}: expected columns ImageId, EncodedPixels; found {fields}")
            table: dict[str, list[str]] = {}
            for row in reader:
                row = {k.strip(): v for k, v in row.items()}
                table.setdefault(row["ImageId"].strip(), []).append(row["EncodedPixels"] or "-1")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the RLE table ({e})") from None
    return table


def image_mask(rles: list[str], where: str = "rle") -> np.ndarray:
    """Union of all rows of one image."""
    mask = np.zeros((SIIM_SIZE, SIIM_SIZE), dtype=bool)
    for i, rle in enumerate(rles):
        mask |= decode_rle(rle, where=f"{where} row {i + 1}")
    return mask
