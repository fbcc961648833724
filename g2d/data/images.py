"""One radiograph from disk, as the model sees it.

Sources mix DICOMs (12-16 bit, some stored inverted as MONOCHROME1, some with a window the
radiologist chose) with 8- and 16-bit PNGs and JPGs. Everything downstream assumes one convention,
so every format ends here as float32 in [0, 1] with bone white, at the file's own resolution.

A file that cannot be used raises `ImageError` naming the file, what is wrong (empty, cut short, not an
image, NaN / inf pixels, ...) and what fixes it; `read_gray8` and `read_stored` are the readers the
datasets and `validate` use, so a file is judged the same way wherever it is read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.datadict import keyword_for_tag
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.uid import UID, UID_dictionary

from g2d.errors import ImageError

DICOM_SUFFIXES = {".dcm", ".dicom"}
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, the weights Pillow's convert("L") uses
_HINT = "is it a DICOM, PNG or JPG? re-copy or re-export it"
_RECOPY = "re-copy or re-download it"
_FINITE = "re-export it with finite values, or remove its row"
_UNDECODABLE = "is corrupt or not an image: cannot decode it"
_NOT_DICOM = "is corrupt: cannot decode it as DICOM"
# Pillow modes whose pixels are 8-bit: converted to grey by Pillow itself. Anything else (16-bit, 32-bit
# integer, float, DICOM) goes through read_image, so it is scaled rather than clipped at 255.
_EIGHT_BIT = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
_PIXEL_DATA = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def read_image(path: str | Path) -> np.ndarray:
    """The image at `path` as a 2-D float32 array in [0, 1], bright = dense; ImageError if unusable."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(path, "does not exist", "check the manifest path or re-fetch the source", check="missing file")
    with path.open("rb") as f:
        head = f.read(132)
    if not head:
        raise ImageError(path, "is empty (0 bytes)", _RECOPY)
    has_magic = head[128:132] == b"DICM"
    if has_magic or path.suffix.lower() in DICOM_SUFFIXES:
        image = _read_dicom(path, force=not has_magic)  # force: a DICOM written without the preamble
    else:
        image = _read_pillow(path)
    if image.ndim != 2:
        raise ImageError(path, f"has shape {image.shape} after decoding, not 2-D", _HINT)
    if not np.isfinite(image).all():  # e.g. values so far apart that scaling them overflows
        raise ImageError(path, "decodes to NaN or inf values", "re-export it from the source",
                         check="non-finite pixels")
    return np.clip(image, 0.0, 1.0).astype(np.float32)  # the clip only absorbs rounding


def read_gray8(path: str | Path) -> Image.Image:
    """The image at `path` as 8-bit grey (Pillow mode L) at its own size: what the datasets resize and train
    on. An 8-bit PNG / JPG is converted by Pillow; a DICOM, 16-bit or float image goes through `read_image`
    (scaled to [0, 1], so a 16-bit PNG is not clipped at 255 and NaN pixels are refused)."""
    image = _open_8bit(Path(path))
    return image.convert("L") if image is not None else Image.fromarray(to_uint8(read_image(path)))


def read_stored(path: str | Path) -> np.ndarray:
    """The decoded pixels, for checks: an 8-bit PNG / JPG as stored (uint8 or bool, H x W or H x W x C),
    anything else as `read_image` gives it; ImageError like `read_image`."""
    image = _open_8bit(Path(path))
    return np.asarray(image) if image is not None else read_image(path)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A [0, 1] image as 8-bit grey, for saving previews."""
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def _open_8bit(path: Path) -> Image.Image | None:
    """The decoded image when `path` is an 8-bit image Pillow reads, else None (read_image then decodes
    it, or says why it cannot: missing, empty, DICOM, not an image)."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return None
    try:
        image = Image.open(path)
    except (UnidentifiedImageError, OSError, ValueError):
        return None
    with image:
        if image.mode not in _EIGHT_BIT:
            return None
        try:
            image.load()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise _pillow_error(path, e) from e
        return image


def _pillow_error(path: Path, e: Exception) -> ImageError:
    if "truncated" in str(e).lower():  # Pillow: "image file is truncated", "Truncated File Read"
        return ImageError(path, "is cut short", _RECOPY, detail=str(e))
    detail = "no image format recognised" if isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}"
    return ImageError(path, _UNDECODABLE, _HINT, detail=detail)  # UnidentifiedImageError's text repeats the path


def _read_dicom(path: Path, force: bool) -> np.ndarray:
    try:
        ds = pydicom.dcmread(path, force=force)
        if not any(k in ds for k in _PIXEL_DATA):
            raise _no_pixel_data(path, ds)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise ImageError(path, f"holds {frames} frames", "a radiograph is one frame: export the frame to use",
                             noun="DICOM")
        _check_pixel_length(path, ds, frames)
    except ImageError:
        raise
    except (InvalidDicomError, OSError, ValueError, EOFError) as e:
        raise ImageError(path, _NOT_DICOM, _HINT, detail=str(e)) from e
    except Exception as e:  # pydicom parses elements lazily: a damaged one raises its own types on first use
        raise ImageError(path, _NOT_DICOM, _HINT, detail=f"{type(e).__name__}: {e}") from e
    try:
        arr = ds.pixel_array  # decoders raise a variety of types, all of them mean the same to us
        if photometric == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
    except Exception as e:
        raise ImageError(path, "has pixel data that cannot be decoded",
                         "re-copy it if it was cut short, else re-export it uncompressed", detail=str(e),
                         noun="DICOM") from e
    if arr.dtype.kind == "f":
        _check_finite(path, arr, "holds NaN or inf pixels", _FINITE)

    if arr.ndim == 3:  # RGB (pydicom already converted YBR; palette LUTs give 8 or 16 bits): luminance
        full = np.iinfo(arr.dtype).max if photometric == "PALETTE COLOR" else 2 ** int(ds.get("BitsStored", 8)) - 1
        return (arr.astype(np.float64) @ _LUMA) / full
    with np.errstate(over="ignore", invalid="ignore"):  # found just below, with the tags to blame
        arr = apply_modality_lut(arr, ds)
    if arr.dtype.kind == "f":
        _check_finite(path, arr, "holds NaN or inf values after its Rescale Slope / Intercept",
                      f"fix those tags (slope {ds.get('RescaleSlope')}, intercept {ds.get('RescaleIntercept')}) "
                      "or re-export it")
    if ds.get("VOILUTSequence") and arr.dtype.kind == "f" and np.array_equal(arr, np.round(arr)):
        arr = arr.astype(np.int64)  # a VOI LUT is indexed by whole numbers; pydicom warns on floats
    try:
        window = _voi_range(ds)
        arr = apply_voi_lut(arr, ds).astype(np.float64)
    except (ValueError, NotImplementedError) as e:  # e.g. a window width below 1, a 9-bit LUT
        raise ImageError(path, "has an unusable window or VOI LUT", "fix or remove those tags", detail=str(e),
                         noun="DICOM") from e
    lo, hi = window if window is not None else (arr.min(), arr.max())
    image = (arr - lo) / (hi - lo) if hi != lo else np.zeros_like(arr)
    return 1.0 - image if photometric == "MONOCHROME1" else image


def _no_pixel_data(path: Path, ds: pydicom.Dataset) -> ImageError:
    """Why a DICOM has no pixel data: not a DICOM at all, an image cut short before it, or not an image."""
    meta = getattr(ds, "file_meta", None) or pydicom.Dataset()
    # tags only (reading a value could fail on a damaged element); group 0: a zeroed preamble read as a command
    named = [t for t in ds.keys() if t.group != 0 and keyword_for_tag(t)]
    size = f"{path.stat().st_size} bytes"
    if not named and not len(meta):
        return ImageError(path, "is not a DICOM file: no DICOM elements found", _HINT, detail=size)
    try:
        sop = str(ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID") or "")
    except Exception:  # a damaged value: as good as none
        sop = ""
    name = UID_dictionary[sop][0] if sop in UID_dictionary else ""  # a UID cut short is no known class
    if not named or "Rows" in ds or "Image Storage" in name:
        return ImageError(path, "has no pixel data, though its header is an image's: the file is cut short",
                          _RECOPY, detail=size, noun="DICOM")
    if name:
        return ImageError(path, f"has no pixel data: it is a {name}, not an image", "export the image itself",
                          noun="DICOM")
    return ImageError(path, "has no pixel data and no known SOP class (cut short, or not an image)",
                      f"{_RECOPY}, or export the image itself", detail=size, noun="DICOM")


def _check_pixel_length(path: Path, ds: pydicom.Dataset, frames: int) -> None:
    """A native (uncompressed) image whose pixel data is shorter than its header says was cut short."""
    syntax = getattr(ds, "file_meta", None) and ds.file_meta.get("TransferSyntaxUID")
    if "PixelData" not in ds or (syntax and UID(str(syntax)).is_compressed):
        return
    try:
        pixels = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * frames
        bits = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        return  # the decoder says what is missing
    expected = (pixels + 7) // 8 if bits == 1 else pixels * (bits // 8)
    got = len(ds.PixelData)
    if got < expected:
        raise ImageError(path, "is cut short: its pixel data ends early", _RECOPY,
                         detail=f"{got} of the {expected} bytes a {ds.Rows} x {ds.Columns} x {bits}-bit image needs",
                         noun="DICOM")


def _check_finite(path: Path, arr: np.ndarray, problem: str, fix: str) -> None:
    finite = np.isfinite(arr)
    if not finite.all():
        nan = int(np.isnan(arr).sum())
        raise ImageError(path, problem, fix, detail=f"{nan} NaN and {arr.size - int(finite.sum()) - nan} inf of "
                         f"{arr.size} pixels", check="non-finite pixels")


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
                _check_finite(path, arr, "holds NaN or inf pixels", _FINITE)
                lo, hi = arr.min(), arr.max()
                return (arr - lo) / (hi - lo) if hi != lo else np.zeros_like(arr)
            if img.mode.startswith("I"):  # I;16, I;16B, I (32-bit): 16-bit unless values say wider
                arr = np.asarray(img, dtype=np.float64)
                return arr / max(65535.0, float(arr.max()))
            return np.asarray(img.convert("L"), dtype=np.float64) / 255.0
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise _pillow_error(path, e) from e
