"""The 14 observations of the CheXpert labeller, shared by CheXpert and MIMIC-CXR-JPG's
`mimic-cxr-2.0.0-chexpert.csv`, and the manifest column each becomes (snake case; "Pleural Effusion" is
`effusion`, the name the paper's tables and g2d's tasks use)."""

from __future__ import annotations

from g2d.errors import DataError

COLUMNS = {
    "No Finding": "no_finding",
    "Enlarged Cardiomediastinum": "enlarged_cardiomediastinum",
    "Cardiomegaly": "cardiomegaly",
    "Lung Opacity": "lung_opacity",
    "Lung Lesion": "lung_lesion",
    "Edema": "edema",
    "Consolidation": "consolidation",
    "Pneumonia": "pneumonia",
    "Atelectasis": "atelectasis",
    "Pneumothorax": "pneumothorax",
    "Pleural Effusion": "effusion",
    "Pleural Other": "pleural_other",
    "Fracture": "fracture",
    "Support Devices": "support_devices",
}
LABELS = tuple(COLUMNS.values())
_VALUES = {"1.0": 1, "1": 1, "0.0": 0, "0": 0, "-1.0": -1, "-1": -1, "": None}


def value(cell: str, where: str, column: str) -> int | None:
    """A labeller cell (1.0 / 0.0 / -1.0 / blank) as 1 / 0 / -1 / None; anything else names the row."""
    try:
        return _VALUES[cell.strip()]
    except KeyError:
        raise DataError(f"{where}: column {column!r} holds {cell!r}; the labeller writes 1.0, 0.0, -1.0 or blank") \
            from None
