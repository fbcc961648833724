"""RSNA Pneumonia import: official layout fixture, the full-size labels file bundled with torchxrayvision, and
errors that name the file and row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from g2d.data import importing, protocols
from g2d.data import manifest as mf
from g2d.data.sources import embedded, rsna
from g2d.errors import DataError
from tests.layouts import rsna as layout

OPTIONS = importing.Options(image_size=32, workers=1)


def test_import_fixture_boxes_masks_and_labels(tmp_path: Path) -> None:
    truth = layout.build(tmp_path / "raw", n=10, size=64)
    result = importing.run("rsna", tmp_path / "raw", tmp_path / "rsna", "rsna-patient", OPTIONS)
    assert result.rows == 10 and not result.failures
    assert mf.validate(tmp_path / "rsna").ok
    df = mf.read_manifest(tmp_path / "rsna").set_index("id")
    for pid, boxes in truth.items():
        row = df.loc[pid]
        stored = json.loads(row["boxes"] or "[]")
        assert [b[:4] for b in stored] == [[v / 2 for v in b] for b in boxes]  # 64 -> 32 px
        assert all(b[4] == "opacity" for b in stored) and row["opacity"] == int(bool(boxes))
        mask = np.asarray(Image.open(tmp_path / "rsna" / row["mask"])) > 127
        area = sum((b[2] - b[0]) * (b[3] - b[1]) for b in stored)
        assert mask.sum() == pytest.approx(area, rel=0.25) if boxes else not mask.any()


def test_missing_dicom_is_listed_once_per_patient(tmp_path: Path) -> None:
    truth = layout.build(tmp_path / "raw", n=9, size=64)
    two_boxes = next(pid for pid, b in truth.items() if len(b) == 2)
    (tmp_path / "raw" / "stage_2_train_images" / f"{two_boxes}.dcm").unlink()
    result = importing.run("rsna", tmp_path / "raw", tmp_path / "rsna", "rsna-patient",
                           importing.Options(image_size=32, workers=1, max_failures=0.2))
    assert len(result.failures) == 1 and result.failures[0]["file"].endswith(f"{two_boxes}.dcm")
    assert result.rows == 8


@pytest.mark.parametrize("line, message", [
    ("{pid},1,2,3,4,2", "Target is '2'"),
    ("{pid},a,2,3,4,1", "Target 1 needs numeric x, y, width, height"),
    ("{pid},1,2,0,4,1", "box width and height must be positive"),
    ("{pid},60,10,20,20,1", r"box \[60.0, 10.0, 80.0, 30.0\] lies outside the 64 x 64 image"),
])
def test_bad_rows_name_the_file_and_row(tmp_path: Path, line: str, message: str) -> None:
    truth = layout.build(tmp_path / "raw", n=3, size=64)
    csv_path = tmp_path / "raw" / "stage_2_train_labels.csv"
    lines = csv_path.read_text().splitlines()
    lines[1] = line.format(pid=next(iter(truth)))
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"stage_2_train_labels.csv row 2: {message}"):
        importing.run("rsna", tmp_path / "raw", tmp_path / "rsna", "rsna-patient", OPTIONS)


def test_bundled_full_size_labels_parse_and_split_to_the_paper_sizes(tmp_path: Path) -> None:
    """torchxrayvision ships the real stage_2_train_labels.csv (30,227 rows, 26,684 patients)."""
    import zipfile

    with zipfile.ZipFile(embedded.package_data_dir() / embedded.RSNA_LABELS.name) as z:
        (tmp_path / rsna.LABELS_FILE).write_bytes(z.read(z.namelist()[0]))
    (tmp_path / rsna.IMAGES_DIR).mkdir()
    scan = rsna.scan(tmp_path, OPTIONS)  # no DICOMs here: every patient is marked missing, none skipped
    assert len(scan.items) == 26684 and all(i.missing for i in scan.items)
    assert sum(len(i.boxes) for i in scan.items) == 9555
    patients = rsna.read_labels(tmp_path / rsna.LABELS_FILE)
    assert len(patients) == 26684 and sum(p.positive for p in patients) == 6012
    assert sum(len(p.boxes) for p in patients) == 9555
    ids = [p.patient_id for p in patients]
    placed = protocols.assign(protocols.load("rsna-g2d"), ids, ids, ["train"] * len(ids), "bundled")
    assert {s: list(placed.values()).count(s) for s in ("train", "val", "test")} == \
        {"train": 16010, "val": 5337, "test": 5337}
