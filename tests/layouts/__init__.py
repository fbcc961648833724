"""Writers of small datasets in their official download layouts (one module per source), for the
importer tests: DICOMs written with pydicom, CSVs with the real column names and quirks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def radiograph(rows: int = 48, cols: int = 40, seed: int = 0, hi: int = 4000) -> np.ndarray:
    """A 12-bit test image: a gradient with noise, so resizing and inversion are visible."""
    rng = np.random.default_rng(seed)
    base = np.linspace(100, hi, rows * cols).reshape(rows, cols)
    return np.clip(base + rng.normal(0, 50, base.shape), 0, 4095).round().astype(np.uint16)


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", preamble: bool = True,
                **elements: object) -> Path:
    """Write `pixels` (frames x rows x cols, or rows x cols) as a 12-bit-in-16 DX DICOM; `elements` sets
    any other attribute by keyword (PatientID, WindowCenter, ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = DX_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DX_SOP_CLASS
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.tobytes()
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, implicit_vr=False, little_endian=True)  # no preamble, no "DICM", no file meta
    return path


def write_picture(path: Path, pixels: np.ndarray) -> Path:
    """An 8-bit PNG or JPG (by suffix) of a 12-bit array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((pixels.astype(np.float64) / 4095 * 255).round().astype(np.uint8)).save(path)
    return path
