"""RSNA Pneumonia Detection labels: `stage_2_train_labels.csv` (patientId, x, y, width, height,
Target) on 1024 x 1024 images; a patient has several rows when several boxes, and Target 0 rows
carry no box."""

from __future__ import annotations

import csv
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

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
