"""ChestX-ray14 as Kaggle (nih-chest-xrays/data) distributes it: Data_Entry_2017.csv (bracketed headers that
split into `OriginalImage[Width` / `Height]`, a trailing empty column), train_val_list.txt and test_list.txt,
BBox_List_2017.csv (`Bbox [x,y,w,h]` header, three empty trailing columns, "Infiltrate"), and the PNGs in
images_001/images/, images_002/images/ (the NIH Box download unpacks them all into images/)."""

from __future__ import annotations

from pathlib import Path

from tests.layouts import radiograph, write_picture

ENTRY_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
BOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"

# (Image Index, Finding Labels, Patient ID, View Position, list); list None: in neither official list
ROWS = [
    ("00000001_000.png", "Cardiomegaly", "1", "PA", "train_val"),
    ("00000001_001.png", "Cardiomegaly|Emphysema", "1", "PA", "train_val"),
    ("00000002_000.png", "No Finding", "2", "PA", "train_val"),
    ("00000003_000.png", "Hernia", "3", "AP", "train_val"),
    ("00000003_001.png", "Infiltration|Effusion|Pleural_Thickening", "3", "AP", "train_val"),
    ("00000004_000.png", "Mass|Nodule", "4", "PA", "train_val"),
    ("00000005_000.png", "Atelectasis", "5", "PA", "test"),
    ("00000005_001.png", "Infiltration|Pneumonia", "5", "AP", "test"),
    ("00000006_000.png", "No Finding", "6", "PA", "test"),
    ("00000006_001.png", "Pneumothorax|Consolidation|Edema|Fibrosis", "6", "PA", "test"),
    ("00000007_000.png", "No Finding", "7", "PA", None),
]
# Image Index, Finding Label, x, y, w, h (on the 64 x 64 fixture images)
BOXES = [
    ("00000005_000.png", "Atelectasis", 10.5, 20.25, 12.0, 8.5),
    ("00000005_001.png", "Infiltrate", 30.0, 4.0, 20.0, 30.0),
    ("00000005_001.png", "Pneumonia", 2.0, 40.0, 16.0, 16.0),
]


def build(root: Path, size: int = 64, entries: str = "Data_Entry_2017.csv", flat: bool = False,
          missing: tuple[str, ...] = ()) -> Path:
    """The download folder `root`; images split over images_001/ and images_002/ (or all in images/ when
    `flat`); names in `missing` are in the table and lists but have no PNG."""
    root.mkdir(parents=True, exist_ok=True)
    lines = [ENTRY_HEADER]
    lists: dict[str, list[str]] = {"train_val": [], "test": []}
    for k, (name, findings, patient, view, pool) in enumerate(ROWS):
        lines.append(f"{name},{findings},{name[9:12].lstrip('0') or '0'},{patient},{40 + k},{'MF'[k % 2]},{view},"
                     f"2500,2048,0.143,0.143,")
        if pool:
            lists[pool].append(name)
        if name not in missing:
            folder = root / "images" if flat else root / f"images_00{1 + k % 2}" / "images"
            write_picture(folder / name, radiograph(size, size, seed=k))
    (root / entries).write_text("\n".join(lines) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(lists["train_val"]) + "\n")
    (root / "test_list.txt").write_text("\n".join(lists["test"]) + "\n")
    boxes = [BOX_HEADER] + [f"{n},{label},{x},{y},{w},{h}" + (",,," if i == 1 else "")
                            for i, (n, label, x, y, w, h) in enumerate(BOXES)]
    (root / "BBox_List_2017.csv").write_text("\n".join(boxes) + "\n")
    return root
