"""CheXpert v1.0 (Stanford ML Group) as distributed: `CheXpert-v1.0/` or `CheXpert-v1.0-small/`.

Layout (--src is that folder):

    train.csv, valid.csv       Path, Sex, Age, Frontal/Lateral, AP/PA, then the 14 labeller observations
    train/patient00001/study1/view1_frontal.jpg
    valid/patient64541/study1/view1_frontal.jpg

Quirks handled here:

- `Path` is relative to the folder *above* the dataset folder (it starts with `CheXpert-v1.0-small/`), so a
  folder that was renamed or moved breaks a plain join. Each path is tried as `src.parent / Path`, then as
  `src / Path` without its first component (the dataset folder under any name), then as `src / Path`.
- Label cells are 1.0 / 0.0 / -1.0 (uncertain) / blank (not mentioned); they stay raw here and the engine
  applies the uncertainty policy (`options.uncertain`). valid.csv (radiologist consensus) holds only 1.0 / 0.0.
- Lateral views are rows of their own; they are dropped (counted), only frontal images are imported.
  `Frontal/Lateral` decides, not `AP/PA`: 17 train.csv rows say Frontal with AP/PA "LL" / "RL"; they are
  kept, as in the 191,027 frontal images the papers' 186,027 + 5,000 split adds up to.
- Train patients are patient00001 - patient64540 and valid patients patient64541 - patient64740, so
  `patientNNNNN_studyN_viewN_frontal` is unique across both files without a pool prefix (the engine refuses
  a duplicate id should a re-packaged copy mix them).

The 5x200 protocol selects on the raw labels as GLoRIA / MGCA (preprocess_chexpert_5x200_data) do: the
five competition labels one-hot and the eight other observations (not No Finding) 0 or blank; an uncertain
(-1) value excludes an image. Neither paper published its ids, so the draw (seeded) differs from theirs,
not what a class means.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path, PurePosixPath

import pandas as pd

from g2d.data import importing
from g2d.data.sources import chexpert_labels
from g2d.errors import DataError

POOLS = {"train": "train.csv", "valid": "valid.csv"}
VIEW = "Frontal/Lateral"
EXPECTED = ("Path", VIEW, *chexpert_labels.COLUMNS)
_UNRESOLVED = Path()
_PART = re.compile(r"(?:^|/)(patient\d+)/(study\d+)/([\w-]+)\.(?:jpe?g|png)$", re.IGNORECASE)


def parse(csv_path: Path, pool: str) -> tuple[list[importing.Item], Counter]:
    """The frontal images `csv_path` lists; laterals are counted, not returned. No file is touched (so the
    full-size table is testable without images): `image` is left unresolved and `source_id` holds the
    CSV's Path, which `scan` locates."""
    df = importing.read_table(csv_path, EXPECTED)
    labels = {name: _label_column(df[col], csv_path, col) for col, name in chexpert_labels.COLUMNS.items()}
    views = df[VIEW].str.strip()
    bad = views[~views.isin(("Frontal", "Lateral"))]
    if len(bad):
        i = int(bad.index[0])
        raise DataError(f"{importing.row_where(csv_path, i)}: column {VIEW!r} holds {df.at[i, VIEW]!r}; "
                        "CheXpert writes Frontal or Lateral")
    dropped = Counter()
    laterals = int((views == "Lateral").sum())
    if laterals:
        dropped[f"lateral views ({csv_path.name})"] = laterals
    paths = df["Path"].str.strip().tolist()
    items = []
    for i in views.index[views == "Frontal"]:
        where = importing.row_where(csv_path, int(i))
        rel = paths[i]
        m = _PART.search(rel)
        if m is None:
            raise DataError(f"{where}: Path {rel!r} is not .../patientNNNNN/studyN/<view>.jpg as in CheXpert "
                            "v1.0; is this CheXpert's own train.csv / valid.csv?")
        patient, study, view = m.group(1), m.group(2), m.group(3)
        items.append(importing.Item(
            id=f"{patient}_{study}_{view}", image=_UNRESOLVED, patient_id=patient, pool=pool, where=where,
            study_id=f"{patient}/{study}", source_id=rel,
            labels={name: labels[name][i] for name in chexpert_labels.LABELS}))
    return items, dropped


def _label_column(cells: pd.Series, csv_path: Path, header: str) -> list[int | None]:
    """A label column as 1 / 0 / -1 / None, each distinct cell parsed once by `chexpert_labels.value`
    (so a bad cell is reported at its first row)."""
    parsed = {}
    for cell in cells.unique():
        first = int(cells.index[cells.eq(cell)][0])
        parsed[cell] = chexpert_labels.value(cell, importing.row_where(csv_path, first), header)
    return [parsed[c] for c in cells.tolist()]


def locate(src: Path, rel: str) -> Path | None:
    """The image file a CSV Path names, wherever the dataset folder sits (see the module docstring)."""
    parts = PurePosixPath(rel).parts
    for candidate in (src.parent / rel, src.joinpath(*parts[1:]) if len(parts) > 1 else None, src / rel):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def scan(src: Path, options: importing.Options) -> importing.Scan:
    items, dropped = [], Counter()
    for pool, name in POOLS.items():
        listed, gone = parse(src / name, pool)
        dropped.update(gone)
        for item in listed:
            rel = item.source_id
            path = locate(src, rel)
            item.image = path or src.joinpath(*PurePosixPath(rel).parts[1:])
            if path is None:
                item.missing = importing.missing_file(item.image, item.where)
            items.append(item)
    return importing.Scan(items, dropped)


IMPORTER = importing.Importer(
    name="chexpert", default_protocol="chexpert-g2d", labels=chexpert_labels.LABELS, columns=("study_id",),
    scan=scan, layout="CheXpert-v1.0(-small)/: train.csv, valid.csv and the trees train/ and valid/ "
                      "(patientNNNNN/studyN/viewN_frontal.jpg)")
