"""ChestX-ray14 (NIH Clinical Center, "ChestX-ray8" paper) as distributed on the NIH Box folder or Kaggle.

Layout (--src holds):

    Data_Entry_2017_v2020.csv (NIH Box, current) or Data_Entry_2017.csv (Kaggle, older)
        Image Index, Finding Labels, Follow-up #, Patient ID, Patient Age, Patient Gender, View Position,
        OriginalImage[Width, Height], OriginalImagePixelSpacing[x, y] (, an empty column in the 2017 file)
    train_val_list.txt, test_list.txt      the official partition, one image file name a line
    images/*.png (the twelve images_0NN.tar.gz unpacked) or images_001/images/ ... images_012/images/ (Kaggle)
    BBox_List_2017.csv (optional)          Image Index, Finding Label, Bbox [x, y, w, h], three empty columns

Quirks handled here:

- The bracketed headers hold commas, so the CSV columns are `OriginalImage[Width` / `Height]` and
  `Bbox [x` / `y` / `w` / `h]`; trailing empty columns are ignored.
- `Finding Labels` joins the 14 findings with "|", or is "No Finding". Each becomes a snake-case label
  column (1 / 0; the labels are NLP-mined, there is no uncertain value) plus `no_finding`.
- The box list calls infiltration "Infiltrate"; its label is the manifest column, `infiltration`. Boxes
  are in the 1024 x 1024 PNG's pixels (the distributed images), x / y / w / h -> x0, y0, x1, y1. Only
  880 images carry boxes, and a finding without a box is not a negative, so no mask is drawn.
- Both Data_Entry files name the patient (`Patient ID`, unpadded: 1, not 00000001); the protocol splits
  train_val_list.txt by it, and the official lists keep patients apart.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from g2d.data import importing
from g2d.errors import DataError

ENTRIES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")  # the first present is read
LISTS = {"train_val": "train_val_list.txt", "test": "test_list.txt"}
BOXES = "BBox_List_2017.csv"
FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
            "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
NO_FINDING = "No Finding"
COLUMNS = {f: f.lower() for f in FINDINGS} | {NO_FINDING: "no_finding"}  # Finding Labels entry -> column
LABELS = tuple(COLUMNS.values())
BOX_LABELS = {**{f: f.lower() for f in FINDINGS}, "Infiltrate": "infiltration"}
VIEWS = ("PA", "AP")
ENTRY_COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "View Position")
BOX_COLUMNS = ("Image Index", "Finding Label", "Bbox [x", "y", "w", "h]")
Box = tuple[float, float, float, float, str]
_NAME = re.compile(r"[\w.-]+\.png")


@dataclass(slots=True)
class Entry:
    """One Data_Entry row."""

    name: str  # Image Index, e.g. 00000001_000.png
    patient_id: str
    view: str
    labels: dict[str, int]
    where: str


def read_entries(path: Path) -> dict[str, Entry]:
    """Image Index -> its row; an unknown finding or a repeated image names the row."""
    df = importing.read_table(path, ENTRY_COLUMNS)
    out: dict[str, Entry] = {}
    for i, (name, findings, patient, view) in enumerate(zip(
            *(df[c].str.strip().tolist() for c in ENTRY_COLUMNS), strict=True)):
        where = importing.row_where(path, i)
        if not _NAME.fullmatch(name):
            raise DataError(f"{where}: Image Index {name!r} is not an image file name like 00000001_000.png")
        if name in out:
            raise DataError(f"{where}: {name} is listed twice (also at {out[name].where}); remove one row")
        names = [f.strip() for f in findings.split("|")]
        unknown = [f for f in names if f not in COLUMNS]
        if unknown or (NO_FINDING in names and len(names) > 1):
            raise DataError(f"{where}: Finding Labels {findings!r} "
                            + (f"holds unknown finding(s) {unknown}" if unknown else "mixes No Finding with findings")
                            + f"; ChestX-ray14 uses {', '.join(FINDINGS)} joined by '|', or {NO_FINDING!r}")
        if not patient:
            raise DataError(f"{where}: Patient ID is blank")
        out[name] = Entry(name, patient, view, {c: int(f in names) for f, c in COLUMNS.items()}, where)
    return out


def read_list(path: Path) -> dict[str, str]:
    """An official list file: image name -> its line (for messages)."""
    if not path.is_file():
        raise DataError(f"{path}: missing; ChestX-ray14's official split is train_val_list.txt and test_list.txt")
    out: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        name = line.strip()
        if not name:
            continue
        where = f"{path} line {n}"
        if not _NAME.fullmatch(name):
            raise DataError(f"{where}: {name!r} is not an image file name like 00000001_000.png")
        out.setdefault(name, where)
    return out


def read_boxes(path: Path, known: Collection[str] | None = None) -> dict[str, list[Box]]:
    """Image Index -> its boxes (x0, y0, x1, y1, label) in the PNG's pixels; bad rows, and with `known` (the
    Data_Entry images) rows of an image the table lacks, are named."""
    df = importing.read_table(path, BOX_COLUMNS)
    out: dict[str, list[Box]] = {}
    for i, (name, label, *xywh) in enumerate(zip(*(df[c].str.strip().tolist() for c in BOX_COLUMNS),
                                                  strict=True)):
        where = importing.row_where(path, i)
        if known is not None and name not in known:
            raise DataError(f"{where}: {name!r} has no row in the Data_Entry table; are both from the same release?")
        if label not in BOX_LABELS:
            raise DataError(f"{where}: Finding Label {label!r} is not a ChestX-ray14 finding; the list uses "
                            f"{', '.join(sorted(BOX_LABELS))}")
        try:
            x, y, w, h = (float(v) for v in xywh)
        except ValueError:
            raise DataError(f"{where}: Bbox [x, y, w, h] must be numbers, got {xywh}") from None
        if w < 0 or h < 0:  # zero is the engine's (counted, left out); negative is a broken row
            raise DataError(f"{where}: box of width {w} and height {h}; neither may be negative")
        out.setdefault(name, []).append((x, y, x + w, y + h, BOX_LABELS[label], where))
    return out


def assemble(entries: dict[str, Entry], lists: dict[str, dict[str, str]],
             boxes: dict[str, list[Box]], locate: Callable[[str], Path | None],
             images: Path = Path("images")) -> importing.Scan:
    """Items from the parsed tables (pool = the list naming the image); `locate` finds an image file by
    name (None: missing, reported as under `images`), so the full-size tables are testable without images."""
    pool_of: dict[str, str] = {}
    for pool, listed in lists.items():
        for name, where in listed.items():
            if name in pool_of:
                raise DataError(f"{where}: {name} is also in {lists[pool_of[name]][name]}; an image belongs to "
                                "one official list")
            if name not in entries:
                raise DataError(f"{where}: {name} has no row in the Data_Entry table; are the lists and the table "
                                "from the same release?")
            pool_of[name] = pool
    items, dropped = [], Counter()
    for name, entry in entries.items():
        if name not in pool_of:
            dropped[f"in neither {LISTS['train_val']} nor {LISTS['test']}"] += 1
            continue
        if entry.view not in VIEWS:
            dropped[f"View Position not {' / '.join(VIEWS)}"] += 1
            continue
        path = locate(name)
        items.append(importing.Item(
            id=name[:-4], image=path or images / name, patient_id=entry.patient_id, pool=pool_of[name],
            where=entry.where, source_id=name, labels=dict(entry.labels), boxes=list(boxes.get(name, [])),
            missing=None if path else importing.missing_file(images / name, entry.where)))
    return importing.Scan(items, dropped)


def find_images(src: Path) -> dict[str, Path]:
    """Image name -> file, under images/ and every images_0NN/ (Kaggle nests images_0NN/images/)."""
    found: dict[str, Path] = {}
    roots = sorted(p for p in src.iterdir() if p.is_dir() and (p.name == "images" or p.name.startswith("images_")))
    for root in roots:
        for folder, _, files in os.walk(root):
            for name in files:
                if name.endswith(".png"):
                    found.setdefault(name, Path(folder) / name)
    return found


def scan(src: Path, options: importing.Options) -> importing.Scan:
    entry_path = next((src / n for n in ENTRIES if (src / n).is_file()), None)
    if entry_path is None:
        raise DataError(f"{src}: holds neither {' nor '.join(ENTRIES)}; the ChestX-ray14 download has one")
    entries = read_entries(entry_path)
    lists = {pool: read_list(src / name) for pool, name in LISTS.items()}
    boxes = read_boxes(src / BOXES, entries) if (src / BOXES).is_file() else {}
    return assemble(entries, lists, boxes, find_images(src).get, src / "images")


IMPORTER = importing.Importer(
    name="chestxray14", default_protocol="chestxray14-official", labels=LABELS, columns=("boxes",), scan=scan,
    layout="Data_Entry_2017_v2020.csv (or Data_Entry_2017.csv), train_val_list.txt, test_list.txt, the PNGs in "
           "images/ or images_0NN/images/, optionally BBox_List_2017.csv")
