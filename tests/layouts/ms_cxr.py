"""MS-CXR as PhysioNet distributes it: MS_CXR_Local_Alignment_v1.0.0.csv (v1.1.0 adds a `split` column), one row
per box, `path` relative to a separate MIMIC-CXR-JPG folder holding files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from tests.layouts import radiograph, write_picture
from tests.layouts.mimic_cxr import dicom_id

HEADER = "dicom_id,category_name,label_text,path,x,y,w,h,image_width,image_height"
WIDTH, HEIGHT = 64, 48  # the JPGs' size (MIMIC-CXR-JPG keeps the DICOMs' resolution; these are tiny)


@dataclass
class Box:
    category: str
    phrase: str
    xywh: tuple[int, int, int, int]


@dataclass
class Annotated:
    dicom_id: str
    subject: str
    study: str
    boxes: list[Box]
    written: bool = True  # False: annotated, but the JPG is not in the MIMIC-CXR-JPG folder

    @property
    def path(self) -> str:
        return f"files/p{self.subject[:2]}/p{self.subject}/s{self.study}/{self.dicom_id}.jpg"


def images() -> list[Annotated]:
    """Eight images of six patients: a phrase with two boxes, an image with two phrases, one JPG missing."""
    d = iter(dicom_id(200 + n) for n in range(100))
    return [
        Annotated(next(d), "15000001", "50000101", [Box("Pneumonia", "Patchy right lower lobe opacity",
                                                        (30, 20, 20, 16))]),
        Annotated(next(d), "15000002", "50000102", [Box("Pleural Effusion", "Small, bilateral pleural effusions",
                                                        (2, 30, 14, 12)),
                                                    Box("Pleural Effusion", "Small, bilateral pleural effusions",
                                                        (46, 30, 16, 12))]),
        Annotated(next(d), "15000003", "50000103", [Box("Cardiomegaly", "Moderate  cardiomegaly", (20, 22, 26, 20)),
                                                    Box("Edema", "Mild pulmonary edema", (6, 8, 52, 30))]),
        Annotated(next(d), "15000003", "50000104", [Box("Atelectasis", "Left basilar atelectasis", (36, 32, 20, 10))]),
        Annotated(next(d), "16000004", "50000105", [Box("Lung Opacity", "Right upper lobe opacity", (8, 4, 18, 14))]),
        Annotated(next(d), "16000005", "50000106", [Box("Pneumothorax", "Small left apical pneumothorax",
                                                        (40, 0, 24, 10))]),
        Annotated(next(d), "17000006", "50000107", [Box("Consolidation", "Left lower lobe consolidation",
                                                        (38, 28, 22, 18))]),
        Annotated(next(d), "17000006", "50000108", [Box("Pneumonia", "Right middle lobe pneumonia", (10, 20, 16, 12))],
                  written=False),
    ]


def build(src: Path, mimic: Path, version: str = "1.0.0", scale: float = 1.0, extra: dict[str, str] | None = None,
          listed_size: tuple[int, int] = (WIDTH, HEIGHT)) -> list[Annotated]:
    """The annotation file under `src`, the JPGs under `mimic`. The JPGs are written `scale` times the listed
    size (a resized copy of MIMIC-CXR-JPG); `extra` adds columns (header -> one value for every row)."""
    annotated = images()
    extra = extra or {}
    rows = [HEADER.split(",") + list(extra)]
    for n, a in enumerate(annotated):
        for b in a.boxes:
            rows.append([a.dicom_id, b.category, b.phrase, a.path, *b.xywh, *listed_size, *extra.values()])
        if a.written:
            write_picture(mimic / a.path, radiograph(round(listed_size[1] * scale), round(listed_size[0] * scale),
                                                     seed=n))
    src.mkdir(parents=True, exist_ok=True)
    with open(src / f"MS_CXR_Local_Alignment_v{version}.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)  # quotes the phrases holding commas
    return annotated
