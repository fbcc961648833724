"""RSNA Pneumonia Detection as Kaggle distributes it: stage_2_train_labels.csv (one row per box, Target 0 rows
without a box) and stage_2_train_images/<patientId>.dcm."""

from __future__ import annotations

from pathlib import Path

from tests.layouts import radiograph, write_dicom


def build(root: Path, n: int = 10, size: int = 64) -> dict[str, list[tuple[float, float, float, float]]]:
    """n patients: every third negative, every third with two boxes; returns patientId -> boxes (x0, y0, x1, y1)."""
    lines = ["patientId,x,y,width,height,Target"]
    truth = {}
    for i in range(n):
        pid = f"{i:08x}-3906-4c2f-b5b4-8aa1280f6181"
        boxes = [] if i % 3 == 0 else [(4.0 + i, 6.0, 20.0, 30.0)] + ([(40.0, 10.0, 16.0, 12.0)] if i % 3 == 2 else [])
        if not boxes:
            lines.append(f"{pid},,,,,0")
        for x, y, w, h in boxes:
            lines.append(f"{pid},{x},{y},{w},{h},1")
        truth[pid] = [(x, y, x + w, y + h) for x, y, w, h in boxes]
        write_dicom(root / "stage_2_train_images" / f"{pid}.dcm", radiograph(size, size, seed=i), PatientID=pid)
    (root / "stage_2_train_labels.csv").write_text("\n".join(lines) + "\n")
    return truth
