"""SIIM-ACR pneumothorax masks: `train-rle.csv` as distributed.

Quirks of the official file, all handled here: the mask column is " EncodedPixels" with a
leading space; "-1" means an empty mask; an image with several pneumothoraces has several rows
(merged); the run-length encoding (decoded by g2d/data/rle.py) is relative (each start is an offset from
the end of the previous run) over the 1024 x 1024 image in column-major order.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from g2d.data import importing
from g2d.data.rle import SIIM_SIZE, check_rle, decode_rle
from g2d.errors import DataError


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


# ---------------------------------------------------------------- import of the official download
# Layout (Kaggle "siim-acr-pneumothorax-segmentation", stage 1):
#   train-rle.csv                                   ImageId, " EncodedPixels"
#   dicom-images-train/<study>/<series>/<ImageId>.dcm
# The DICOMs' PatientID is each image's patient: the protocol splits on the raw id, in memory; the manifest
# (and so dataset.json, MLflow and every message) only ever holds its pseudonym (`importing.pseudonym`). No
# other header field is read here (name, birth date, accession number stay in the DICOMs).

RLE_FILE = "train-rle.csv"


def _dicoms(src: Path) -> dict[str, Path]:
    """ImageId (the file's stem) -> DICOM path, anywhere under src."""
    found: dict[str, Path] = {}
    for folder, _, files in os.walk(src):
        for name in files:
            if name.lower().endswith(".dcm"):
                found.setdefault(name[:-4], Path(folder) / name)
    return found


def _patient_id(path: Path) -> str:
    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"]).get("PatientID", ""))
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return ""  # the worker decodes the file and reports why it fails


def scan(src: Path, options: importing.Options) -> importing.Scan:
    csv_path = src / RLE_FILE
    table = importing.read_table(csv_path, ("ImageId", "EncodedPixels"))
    dicoms = _dicoms(src)
    rows: dict[str, list[int]] = {}
    for i, image_id in enumerate(table["ImageId"].str.strip()):
        rows.setdefault(image_id, []).append(i)
    items = []
    for image_id, idx in rows.items():
        where = f"{importing.row_where(csv_path, idx[0])}" + (f" (+{len(idx) - 1} more rows)" if len(idx) > 1 else "")
        rles = [table.at[i, "EncodedPixels"].strip() or "-1" for i in idx]
        for i, rle in zip(idx, rles, strict=True):
            check_rle(rle, importing.row_where(csv_path, i))
        path = dicoms.get(image_id)
        expected = src / "dicom-images-train" / f"{image_id}.dcm"
        raw = path and _patient_id(path)  # no header id: the image is its own patient
        items.append(importing.Item(
            id=image_id, image=path or expected, patient_id=importing.pseudonym(raw, "siim") if raw else image_id,
            split_key=raw or image_id, pool="train",
            where=where, missing=None if path else importing.missing_file(expected, where, "DICOM of this ImageId"),
            source_id=image_id, mask="rle", rle=rles,  # on the DICOM's own size (1024 x 1024 in SIIM)
            labels={"pneumothorax": int(any(r != "-1" for r in rles))}))
    unlabelled = len(set(dicoms) - set(rows))
    dropped = Counter({f"DICOMs without a row in {RLE_FILE} (stage 1 test images)": unlabelled} if unlabelled else {})
    return importing.Scan(items, dropped)


IMPORTER = importing.Importer(
    name="siim", default_protocol="siim-g2d", labels=("pneumothorax",), columns=("mask",), scan=scan,
    layout=f"{RLE_FILE} and the DICOM tree dicom-images-train/<study>/<series>/<ImageId>.dcm")
