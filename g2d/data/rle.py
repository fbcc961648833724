"""Run-length encoded masks as SIIM-ACR distributes them (`train-rle.csv`): "-1" (or nothing) is an empty
mask; otherwise offset / length pairs, each start an offset from the end of the previous run, over the
image in column-major order. Read by the SIIM source (g2d/data/sources/siim.py) and by the import engine
(g2d/data/importing.py) for any item whose mask is given as RLE."""

from __future__ import annotations

import numpy as np

from g2d.errors import DataError

SIIM_SIZE = 1024  # the SIIM-ACR images' size, which their RLE is defined on


def _rle_numbers(rle: str, where: str) -> np.ndarray:
    """The offset / length pairs of a non-empty RLE string, or the error naming its row."""
    try:
        nums = np.asarray([int(x) for x in rle.split()], dtype=np.int64)
    except ValueError:
        raise DataError(f"{where}: EncodedPixels is not a list of integers: {rle[:40]!r}") from None
    if nums.size % 2:
        raise DataError(f"{where}: EncodedPixels has an odd number of values ({nums.size}); it must be "
                        "offset / length pairs")
    return nums


def check_rle(rle: str, where: str, height: int = SIIM_SIZE, width: int = SIIM_SIZE) -> None:
    """Malformed RLE is an error naming the row, found before any image is decoded."""
    if rle in ("", "-1"):
        return
    nums = _rle_numbers(rle, where)
    if (nums < 0).any() or nums.sum() > height * width:
        raise DataError(f"{where}: EncodedPixels runs leave the {height} x {width} image")


def decode_rle(rle: str, height: int = SIIM_SIZE, width: int = SIIM_SIZE, where: str = "rle") -> np.ndarray:
    """Relative-offset, column-major RLE -> bool (height, width). '-1' or '' -> empty."""
    flat = np.zeros(height * width, dtype=bool)
    rle = rle.strip()
    if rle in ("", "-1"):
        return flat.reshape(width, height).T
    nums = _rle_numbers(rle, where)
    pos = 0
    for offset, length in zip(nums[0::2], nums[1::2], strict=True):
        start = pos + int(offset)
        end = start + int(length)
        if offset < 0 or length < 0 or end > flat.size:
            raise DataError(f"{where}: run ({offset}, {length}) leaves the {height}x{width} image")
        flat[start:end] = True
        pos = end
    return flat.reshape(width, height).T
