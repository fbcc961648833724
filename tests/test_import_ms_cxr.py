"""MS-CXR import: one image per dicom_id with a finding per box, images from a separate MIMIC-CXR-JPG folder,
boxes rescaled for a resized copy, and the errors that name the file and row."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from g2d.data import importing
from g2d.data import manifest as mf
from g2d.data.sources import ms_cxr
from g2d.errors import DataError
from tests.layouts import ms_cxr as layout
from tests.layouts import radiograph, write_picture


def _options(mimic: Path) -> importing.Options:
    return importing.Options(image_size=32, workers=1, shard_size=3, max_failures=0.2, images=mimic)


def _expected(annotated: list[layout.Annotated], scale: float) -> dict[str, list[dict]]:
    """dicom_id -> findings as the manifest holds them, at the stored size (`scale` of the listed pixels)."""
    return {a.dicom_id: [{"phrase": " ".join(b.phrase.split()), "kind": ms_cxr.kind(b.category),
                          "box": [b.xywh[0] * scale, b.xywh[1] * scale, (b.xywh[0] + b.xywh[2]) * scale,
                                  (b.xywh[1] + b.xywh[3]) * scale]} for b in a.boxes]
            for a in annotated if a.written}


def test_import_one_row_per_image_with_a_finding_per_box(tmp_path: Path) -> None:
    annotated = layout.build(tmp_path / "ms-cxr", tmp_path / "mimic")
    result = importing.run("ms-cxr", tmp_path / "ms-cxr", tmp_path / "out", None, _options(tmp_path / "mimic"))
    out = tmp_path / "out"
    assert mf.validate(out).ok and result.rows == 7
    df = mf.read_manifest(out).set_index("id")
    findings = {i: json.loads(cell) for i, cell in df["findings"].items()}
    assert findings == _expected(annotated, 0.5)  # 64 x 48 stored as 32 x 24
    two_boxes = annotated[1].dicom_id
    assert [f["phrase"] for f in findings[two_boxes]] == ["Small, bilateral pleural effusions"] * 2
    assert json.loads(df.at[two_boxes, "boxes"]) == [[1, 15, 8, 21, "effusion"], [23, 15, 31, 21, "effusion"]]
    assert findings[annotated[2].dicom_id][0]["phrase"] == "Moderate cardiomegaly"  # whitespace normalised
    by_id = {a.dicom_id: a for a in annotated}
    for dicom, row in df.iterrows():
        assert (row["patient_id"], row["study_id"]) == (by_id[dicom].subject, by_id[dicom].study)
    assert set(df["split"]) <= {"val", "test"} and df.groupby("patient_id")["split"].nunique().max() == 1
    missing = annotated[-1]
    assert result.failures == [{"file": str(tmp_path / "mimic" / missing.path),
                                "where": f"{tmp_path / 'ms-cxr' / 'MS_CXR_Local_Alignment_v1.0.0.csv'} row 11",
                                "error": "MIMIC-CXR-JPG image of this dicom_id listed here does not exist"}]
    assert json.loads((out / "dataset.json").read_text())["protocol"]["name"] == "ms-cxr-patient"


def test_v1_1_with_split_column_files_folder_and_a_resized_copy(tmp_path: Path) -> None:
    """The newest annotation file wins; --images may be files/ itself; JPGs at half the annotated size get the
    boxes rescaled to their pixels, so the stored copy is the same as from full-size JPGs."""
    layout.build(tmp_path / "ms-cxr", tmp_path / "old-mimic", version="1.0.0", listed_size=(10, 10))
    annotated = layout.build(tmp_path / "ms-cxr", tmp_path / "mimic", version="1.1.0", scale=0.5,
                             listed_size=(128, 96), extra={"split": "test"})
    result = importing.run("ms-cxr", tmp_path / "ms-cxr", tmp_path / "out", None,
                           _options(tmp_path / "mimic" / "files"))
    assert result.rows == 7 and mf.validate(tmp_path / "out").ok
    df = mf.read_manifest(tmp_path / "out").set_index("id")
    expected = {d: [{**f, "box": [v / 2 for v in f["box"]]} for f in fs]  # 128 x 96 -> 64 x 48 -> 32 x 24
                for d, fs in _expected(annotated, 0.5).items()}
    assert {i: json.loads(c) for i, c in df["findings"].items()} == expected
    assert set(df["split"]) <= {"val", "test"}  # the protocol's split, not the file's


def test_kinds_follow_g2d_label_names() -> None:
    assert [ms_cxr.kind(c) for c in ("Pleural Effusion", "Lung Opacity", "Cardiomegaly", "Pleural  Thickening")] == \
        ["effusion", "lung_opacity", "cardiomegaly", "pleural_thickening"]


# ---------------------------------------------------------------- errors naming the file and row


def _edit_row(csv_path: Path, line: int, column: str, value: str) -> None:
    rows = list(csv.reader(csv_path.read_text().splitlines()))
    rows[line - 1][rows[0].index(column)] = value
    with open(csv_path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def test_box_outside_the_image_names_file_and_row(tmp_path: Path) -> None:
    layout.build(tmp_path / "ms-cxr", tmp_path / "mimic")
    csv_path = tmp_path / "ms-cxr" / "MS_CXR_Local_Alignment_v1.0.0.csv"
    _edit_row(csv_path, 4, "x", "52")  # the second box of the two-box phrase: 52 + 16 > 64
    with pytest.raises(DataError, match=r"v1.0.0.csv row 4: box x, y, w, h = 52, 30, 16, 12 lies outside the image "
                                        r"\(image_width x image_height = 64 x 48\)"):
        importing.run("ms-cxr", tmp_path / "ms-cxr", tmp_path / "out", None, _options(tmp_path / "mimic"))


@pytest.mark.parametrize("column, value, message", [
    ("w", "wide", r"row 5: x, y, w, h, image_width, image_height must be numbers, got \['20', '22', 'wide'"),
    ("h", "0", r"row 5: box w x h = 26 x 0 on an image of 64 x 48; all must be positive"),
    ("label_text", " ", r"row 5: label_text is empty"),
    ("path", "files/p15/p15000003/s50000103/other.jpg", r"row 5: path .* is not MIMIC-CXR-JPG's "),
    ("image_width", "128", r"row 6: image_width x image_height is 128 x 48 here but 64 x 48 at .* row 5"),
])
def test_malformed_rows_are_named(tmp_path: Path, column: str, value: str, message: str) -> None:
    layout.build(tmp_path / "ms-cxr", tmp_path / "mimic")
    line = 6 if column == "image_width" else 5
    _edit_row(tmp_path / "ms-cxr" / "MS_CXR_Local_Alignment_v1.0.0.csv", line, column, value)
    with pytest.raises(DataError, match=message):
        importing.run("ms-cxr", tmp_path / "ms-cxr", tmp_path / "out", None, _options(tmp_path / "mimic"))


def test_an_image_of_another_shape_is_not_taken_for_a_resized_copy(tmp_path: Path) -> None:
    annotated = layout.build(tmp_path / "ms-cxr", tmp_path / "mimic")
    write_picture(tmp_path / "mimic" / annotated[0].path, radiograph(48, 48))
    with pytest.raises(DataError, match=r"row 2: image_width x image_height is 64 x 48 but .*\.jpg is 48 x 48, not a "
                                        r"resized copy of it; is --images the MIMIC-CXR-JPG 2.0.0 folder\?"):
        importing.run("ms-cxr", tmp_path / "ms-cxr", tmp_path / "out", None, _options(tmp_path / "mimic"))


def test_missing_column_and_missing_file_are_named(tmp_path: Path) -> None:
    layout.build(tmp_path / "ms-cxr", tmp_path / "mimic")
    csv_path = tmp_path / "ms-cxr" / "MS_CXR_Local_Alignment_v1.0.0.csv"
    csv_path.write_text(csv_path.read_text().replace("label_text", "phrase", 1))
    with pytest.raises(DataError, match=r"v1.0.0.csv: missing column\(s\) \['label_text'\]; expected \['dicom_id', "
                                        r"'category_name', 'label_text', .*found \['dicom_id', 'category_name', "
                                        r"'phrase', 'path'"):
        importing.run("ms-cxr", tmp_path / "ms-cxr", tmp_path / "a", None, _options(tmp_path / "mimic"))
    csv_path.unlink()
    with pytest.raises(DataError, match=r"no MS_CXR_Local_Alignment_v1.0.0.csv \(or v1.1.0\)"):
        importing.run("ms-cxr", tmp_path / "ms-cxr", tmp_path / "b", None, _options(tmp_path / "mimic"))
