"""CheXpert v1.0 as Stanford distributes it: `CheXpert-v1.0-small/` holding train.csv and valid.csv (Path
relative to the folder above, `CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`), frontal
and lateral rows, labeller cells 1.0 / 0.0 / -1.0 / blank, and the JPGs in train/ and valid/."""

from __future__ import annotations

from pathlib import Path

from g2d.data.sources import chexpert_labels
from tests.layouts import radiograph, write_picture

FOLDER = "CheXpert-v1.0-small"
HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *chexpert_labels.COLUMNS]

# (pool, patient, study, view file, Frontal/Lateral, {CheXpert header: cell}); the rest of the cells blank
ROWS = [
    ("train", "patient00001", "study1", "view1_frontal", "Frontal",
     {"Atelectasis": "-1.0", "Cardiomegaly": "-1.0", "Edema": "-1.0", "Support Devices": "1.0"}),
    ("train", "patient00001", "study1", "view2_lateral", "Lateral", {"Atelectasis": "-1.0"}),
    ("train", "patient00001", "study2", "view1_frontal", "Frontal", {"No Finding": "1.0"}),
    ("train", "patient00002", "study1", "view1_frontal", "Frontal",
     {"Pleural Effusion": "1.0", "Cardiomegaly": "0.0", "Lung Opacity": "1.0"}),
    ("train", "patient00002", "study1", "view2_frontal", "Frontal", {"Pleural Effusion": "1.0"}),
    ("train", "patient00003", "study1", "view1_frontal", "Frontal", {"Atelectasis": "1.0", "Edema": "0.0"}),
    ("train", "patient00003", "study1", "view2_lateral", "Lateral", {"Atelectasis": "1.0"}),
    ("train", "patient00004", "study1", "view1_frontal", "Frontal", {"Consolidation": "-1.0", "Pneumonia": "1.0"}),
    ("train", "patient00005", "study3", "view1_frontal", "Frontal", {"Cardiomegaly": "1.0", "Fracture": "-1.0"}),
    ("train", "patient00006", "study1", "view1_frontal", "Frontal", {"Edema": "1.0"}),
    ("valid", "patient64541", "study1", "view1_frontal", "Frontal",
     {h: "0.0" for h in chexpert_labels.COLUMNS} | {"Cardiomegaly": "1.0"}),
    ("valid", "patient64542", "study1", "view1_frontal", "Frontal",
     {h: "0.0" for h in chexpert_labels.COLUMNS} | {"No Finding": "1.0"}),
]


def image_id(patient: str, study: str, view: str) -> str:
    return f"{patient}_{study}_{view}"


def build(root: Path, size: int = 48, missing: tuple[str, ...] = (), folder: str = FOLDER) -> Path:
    """The dataset folder `root/folder` (10 frontal and 2 lateral images); the image ids in `missing` are
    listed but have no file. `folder` other than the official name checks that a renamed copy imports."""
    src = root / folder
    csvs: dict[str, list[str]] = {"train": [",".join(HEADER)], "valid": [",".join(HEADER)]}
    for k, (pool, patient, study, view, frontal, cells) in enumerate(ROWS):
        rel = f"{FOLDER}/{pool}/{patient}/{study}/{view}.jpg"  # always the official prefix, as the CSVs have
        ap_pa = "AP" if frontal == "Frontal" else ""
        csvs[pool].append(",".join([rel, "Female" if k % 2 else "Male", str(50 + k), frontal, ap_pa,
                                    *(cells.get(h, "") for h in chexpert_labels.COLUMNS)]))
        if image_id(patient, study, view) not in missing:
            write_picture(src / pool / patient / study / f"{view}.jpg", radiograph(size, size - 8, seed=k))
    src.mkdir(parents=True, exist_ok=True)
    for pool, lines in csvs.items():
        (src / f"{pool}.csv").write_text("\n".join(lines) + "\n")
    return src


def raw_labels(view_id: str) -> dict[str, int | None]:
    """The manifest label columns of a fixture image before any uncertainty policy."""
    for _, patient, study, view, _, cells in ROWS:
        if image_id(patient, study, view) == view_id:
            return {name: chexpert_labels.value(cells.get(h, ""), "fixture", h)
                    for h, name in chexpert_labels.COLUMNS.items()}
    raise KeyError(view_id)
