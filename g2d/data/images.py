"""One radiograph from disk, as the model sees it.

Sources mix DICOMs (12-16 bit, some stored inverted as MONOCHROME1, some with a window the
radiologist chose) with 8- and 16-bit PNGs and JPGs. Everything downstream assumes one convention,
so every format ends here as float32 in [0, 1] with bone white, at the file's own resolution.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from g2d.errors import DataError

DICOM_SUFFIXES = {".dcm", ".dicom"}
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, the weights Pillow's convert("L") uses
_HINT = "is it a DICOM, PNG or JPG?"


def read_image(path: str | Path) -> np.ndarray:
    """The image at `path` as a 2-D float32 array in [0, 1], bright = dense; DataError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image {path} does not exist; check the manifest path or re-fetch the source")
    with path.open("rb") as f:
        head = f.read(132)
    if not head:
        raise DataError(f"image {path} is empty (0 bytes); re-copy or re-download it")
    has_magic = head[128:132] == b"DICM"
    if has_magic or path.suffix.lower() in DICOM_SUFFIXES:
        image = _read_dicom(path, force=not has_magic)  # force: a DICOM written without the preamble
    else:
        image = _read_pillow(path)
    if image.ndim != 2:
        raise DataError(f"image {path} has shape {image.shape} after decoding, not 2-D; {_HINT}")
    if not np.isfinite(image).all():
        raise DataError(f"image {path} decodes to NaN or inf values; re-export it from the source")
    return np.clip(image, 0.0, 1.0).astype(np.float32)  # the clip only absorbs rounding


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A [0, 1] image as 8-bit grey, for saving previews."""
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def _read_dicom(path: Path, force: bool) -> np.ndarray:
    try:
        ds = pydicom.dcmread(path, force=force)
    except (InvalidDicomError, OSError, ValueError, EOFError) as e:
        raise DataError(f"cannot decode {path} as DICOM ({e}); {_HINT}") from e
    if "PixelData" not in ds:
        raise DataError(f"DICOM {path} has no pixel data (a report, a presentation state, not a DICOM at all?); "
                        "export the image itself")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DataError(f"DICOM {path} holds {frames} frames; a radiograph is one frame: export the frame to use")
    try:
        arr = ds.pixel_array  # decoders raise a variety of types, all of them mean the same to us
        if photometric == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
    except Exception as e:
        raise DataError(f"cannot decode the pixel data of {path} ({e}); re-export it uncompressed") from e

    if arr.ndim == 3:  # RGB (pydicom already converted YBR; palette LUTs give 8 or 16 bits): luminance
        full = np.iinfo(arr.dtype).max if photometric == "PALETTE COLOR" else 2 ** int(ds.get("BitsStored", 8)) - 1
        return (arr.astype(np.float64) @ _LUMA) / full
    arr = apply_modality_lut(arr, ds)
    if ds.get("VOILUTSequence") and arr.dtype.kind == "f" and np.array_equal(arr, np.round(arr)):
        arr = arr.astype(np.int64)  # a VOI LUT is indexed by whole numbers; pydicom warns on floats
    try:
        window = _voi_range(ds)
        arr = apply_voi_lut(arr, ds).astype(np.float64)
    except (ValueError, NotImplementedError) as e:  # e.g. a window width below 1, a 9-bit LUT
        raise DataError(f"DICOM {path} has an unusable window or VOI LUT ({e}); fix or remove those tags") from e
    lo, hi = window if window is not None else (arr.min(), arr.max())
    image = (arr - lo) / (hi - lo) if hi != lo else np.zeros_like(arr)
    return 1.0 - image if photometric == "MONOCHROME1" else image


def _voi_range(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """What the file's VOI transform (LUT or window) maps to, or None when it defines none.

    Asks pydicom what the transform does to the extreme inputs, so the [0, 1] scale follows its
    output-range rules (bits stored, sign, rescale) instead of restating them here."""
    lut = ds.get("VOILUTSequence")
    if lut and lut[0].get("LUTDescriptor") is not None and lut[0].get("LUTData") is not None:
        entries, first = lut[0].LUTDescriptor[0] or 2**16, lut[0].LUTDescriptor[1]
        out = apply_voi_lut(np.arange(first, first + entries), ds)  # every entry of the LUT
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        out = apply_voi_lut(np.array([-np.inf, np.inf]), ds)
    else:
        return None
    return float(out.min()), float(out.max())


def _read_pillow(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "F":
                arr = np.asarray(img, dtype=np.float64)
                lo, hi = arr.min(), arr.max()
                return (arr - lo) / (hi - lo) if hi != lo else np.zeros_like(arr)
            if img.mode.startswith("I"):  # I;16, I;16B, I (32-bit): 16-bit unless values say wider
                arr = np.asarray(img, dtype=np.float64)
                return arr / max(65535.0, float(arr.max()))
            return np.asarray(img.convert("L"), dtype=np.float64) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot decode {path} as an image ({e}); {_HINT}") from e
