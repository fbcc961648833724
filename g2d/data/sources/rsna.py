"""RSNA Pneumonia Detection labels: `stage_2_train_labels.csv` (patientId, x, y, width, height,
Target) on 1024 x 1024 images; a patient has several rows when several boxes, and Target 0 rows
carry no box."""

from __future__ import annotations

import csv
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

from g2d.data import importing
from g2d.errors import DataError

RSNA_SIZE = 1024


@dataclass(frozen=True)
class RSNAPatient:
    patient_id: str
    boxes: tuple[tuple[float, float, float, float], ...]  # x0, y0, x1, y1 in 1024-px pixels

    @property
    def positive(self) -> bool:
        return bool(self.boxes)


def _rows(path: Path):
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith(".csv")]
            if not names:
                raise DataError(f"{path}: no .csv inside the zip")
            text = z.read(names[0]).decode("utf-8")
    else:
        text = path.read_text(encoding="utf-8")
    return list(csv.DictReader(io.StringIO(text)))


def read_labels(path: Path) -> list[RSNAPatient]:
    """One entry per patient, in file order, boxes merged."""
    try:
        rows = _rows(path)
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read RSNA labels ({e})") from None
    boxes: dict[str, list[tuple[float, float, float, float]]] = {}
    for i, row in enumerate(rows, start=2):
        try:
            pid, target = row["patientId"], int(row["Target"])
        except (KeyError, ValueError):
            raise DataError(f"{path}: row {i}: needs patientId and Target (0/1)") from None
        lst = boxes.setdefault(pid, [])
        if target == 1:
            try:
                x, y, w, h = (float(row[k]) for k in ("x", "y", "width", "height"))
            except (KeyError, ValueError):
                raise DataError(f"{path}: row {i}: Target 1 without a numeric x, y, width, height") from None
            lst.append((x, y, x + w, y + h))
    return [RSNAPatient(pid, tuple(b)) for pid, b in boxes.items()]


# ---------------------------------------------------------------- import of the official download
# Layout (Kaggle "rsna-pneumonia-detection-challenge", stage 2):
#   stage_2_train_labels.csv            patientId, x, y, width, height, Target (one row per box; Target 0: no box)
#   stage_2_train_images/<patientId>.dcm
# One image per patientId, so the patient id is the image id.

LABELS_FILE = "stage_2_train_labels.csv"
IMAGES_DIR = "stage_2_train_images"


def scan(src: Path, options: importing.Options) -> importing.Scan:
    csv_path = src / LABELS_FILE
    table = importing.read_table(csv_path, ("patientId", "x", "y", "width", "height", "Target"))
    items: dict[str, importing.Item] = {}
    for i, row in enumerate(table.itertuples(index=False)):
        where = importing.row_where(csv_path, i)
        pid = row.patientId.strip()
        if row.Target.strip() not in ("0", "1"):
            raise DataError(f"{where}: Target is {row.Target!r}; it must be 0 (no pneumonia) or 1 (a box)")
        item = items.get(pid)
        if item is None:
            path = src / IMAGES_DIR / f"{pid}.dcm"
            item = items[pid] = importing.Item(
                id=pid, image=path, patient_id=pid, pool="train", where=where, source_id=pid, mask="boxes",
                labels={"opacity": 0},
                missing=None if path.is_file() else importing.missing_file(path, where, "DICOM of this patientId"))
        if row.Target.strip() == "1":
            try:
                x, y, w, h = (float(v) for v in (row.x, row.y, row.width, row.height))
            except ValueError:
                raise DataError(f"{where}: Target 1 needs numeric x, y, width, height, got "
                                f"{[row.x, row.y, row.width, row.height]}") from None
            if w <= 0 or h <= 0:
                raise DataError(f"{where}: box width and height must be positive, got {w} x {h}")
            item.boxes.append((x, y, x + w, y + h, "opacity"))
            item.labels["opacity"] = 1
    return importing.Scan(sorted(items.values(), key=lambda it: it.id))


IMPORTER = importing.Importer(
    name="rsna", default_protocol="rsna-g2d", labels=("opacity",), columns=("mask", "boxes"), scan=scan,
    layout=f"{LABELS_FILE} and {IMAGES_DIR}/<patientId>.dcm")
