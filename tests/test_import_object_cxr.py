"""Object-CXR import: rectangles, ellipses and polygons become boxes and drawn masks on the stored
(resized) image, negatives get an empty mask, and malformed annotations name the file and row."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from g2d.data import importing
from g2d.data import manifest as mf
from g2d.data.sources import object_cxr
from g2d.errors import DataError
from tests.layouts import object_cxr as layout

OPTIONS = importing.Options(image_size=32, workers=1, shard_size=4)


def _run(raw: Path, out: Path, protocol: str = "object-cxr-patient", options: importing.Options = OPTIONS):
    return importing.run("object-cxr", raw, out, protocol, options)


def _mask(folder: Path, row) -> np.ndarray:
    return np.asarray(Image.open(folder / row["mask"])) > 127


def test_import_fixture_boxes_masks_and_validates(tmp_path: Path) -> None:
    truth = layout.build(tmp_path / "raw")
    result = _run(tmp_path / "raw", tmp_path / "ocxr")
    assert result.rows == 10 and not result.failures
    assert mf.validate(tmp_path / "ocxr").ok
    df = mf.read_manifest(tmp_path / "ocxr").set_index("source_id")
    assert set(df.loc[["08001.jpg", "08002.jpg", "08003.jpg"], "split"]) == {"test"}  # dev is the test split
    assert set(df["split"]) == {"train", "val", "test"}
    assert (df["patient_id"] == df["id"]).all() and df.loc["00001.jpg", "id"] == "train-00001"
    for name, ((w, h), annotation) in truth.items():
        row = df.loc[name]
        scale = 32 / max(w, h)
        stored = Image.open(tmp_path / "ocxr" / row["image"]).size
        assert stored == (round(w * scale), round(h * scale))
        mask = _mask(tmp_path / "ocxr", row)
        assert mask.shape == (stored[1], stored[0])
        assert row["foreign_object"] == int(bool(annotation))
        if not annotation:
            assert not row["boxes"] and not mask.any()  # negatives: no box, an empty mask
            continue
        boxes = json.loads(row["boxes"])
        assert len(boxes) == len(annotation.split(";")) and all(b[4] == "foreign_object" for b in boxes)
        assert mask.any()

    # the rectangle 0 8 6 40 30 on a 64 x 48 image, stored at 32 x 24 (scale 1/2)
    row = df.loc["00001.jpg"]
    assert json.loads(row["boxes"]) == [[4.0, 3.0, 20.0, 15.0, "foreign_object"]]
    mask = _mask(tmp_path / "ocxr", row)
    assert abs(int(mask.sum()) - 16 * 12) <= 16 + 12 + 1  # the filled rectangle, up to its edge pixels
    assert mask[9, 12] and not mask[20, 28]

    # the ellipse 1 4 4 60 44 (box 56 x 40 -> 28 x 20 stored): area ~ pi/4 of its box
    mask = _mask(tmp_path / "ocxr", df.loc["00002.jpg"])
    assert mask.sum() / (28 * 20) == pytest.approx(math.pi / 4, abs=0.08)
    assert not mask[2, 2] and mask[12, 16]  # the box's corner is outside the ellipse, its centre inside

    # the polygon's box is the bounding box of its vertices: 5 5 35 40 on a 40 x 56 image, stored 23 x 32
    boxes = json.loads(df.loc["00003.jpg", "boxes"])
    sx, sy = 23 / 40, 32 / 56
    assert boxes[0][:4] == pytest.approx([5 * sx, 5 * sy, 35 * sx, 40 * sy], abs=0.01)
    # a triangle covers about half of its bounding box
    tri = _mask(tmp_path / "ocxr", df.loc["00006.jpg"])[:, 18:]  # only the triangle lies right of x = 36 / 2
    assert tri.sum() / (10 * 15) == pytest.approx(0.5, abs=0.15)


def test_missing_image_is_a_listed_failure(tmp_path: Path) -> None:
    layout.build(tmp_path / "raw", missing=1)
    result = _run(tmp_path / "raw", tmp_path / "ocxr",
                  options=importing.Options(image_size=32, workers=1, max_failures=0.2))
    assert result.rows == 9 and len(result.failures) == 1
    assert result.failures[0]["file"].endswith("train/00007.jpg")
    assert result.failures[0]["where"].endswith("train.csv row 8")


@pytest.mark.parametrize("annotation, message", [
    ("3 1 1 5 5", r"unknown type '3'; Object-CXR types are 0 \(rectangle\), 1 \(ellipse\) and 2 \(polygon\)"),
    ("2 1 1 5 5 9", r"odd number of coordinates \(5\)"),
    ("2 1 1 5 5", r"a polygon needs at least 3 points, got 2"),
    ("0 1 1 5", r"odd number of coordinates"),
    ("1 1 1 5 5 7 7", r"a ellipse is 'x1 y1 x2 y2' \(two corners\), got 6 coordinates"),
    ("0 1 one 5 5", r"coordinates are not numbers"),
])
def test_malformed_annotation_names_file_and_row(tmp_path: Path, annotation: str, message: str) -> None:
    layout.build(tmp_path / "raw")
    line = layout.set_annotation(tmp_path / "raw", "train", 2, f"0 1 1 4 4;{annotation}")
    with pytest.raises(DataError, match=rf"train.csv row {line}: object 2 .*{message}"):
        _run(tmp_path / "raw", tmp_path / "ocxr")


def test_box_outside_the_image_names_the_row(tmp_path: Path) -> None:
    layout.build(tmp_path / "raw")
    line = layout.set_annotation(tmp_path / "raw", "dev", 0, "0 30 20 90 40")  # the image is 64 wide
    with pytest.raises(DataError, match=rf"dev.csv row {line}: box \[30.0, 20.0, 90.0, 40.0\] lies outside the "
                                        r"64 x 48 image"):
        _run(tmp_path / "raw", tmp_path / "ocxr")


def test_duplicate_image_name_names_both_rows(tmp_path: Path) -> None:
    layout.build(tmp_path / "raw")
    path = tmp_path / "raw" / "dev.csv"
    path.write_text(path.read_text() + "08001.jpg,\n")
    with pytest.raises(DataError, match=r"dev.csv row 5: 08001.jpg is listed twice \(also at .*dev.csv row 2\)"):
        _run(tmp_path / "raw", tmp_path / "ocxr")


def test_missing_column_names_expected_and_found(tmp_path: Path) -> None:
    layout.build(tmp_path / "raw")
    path = tmp_path / "raw" / "train.csv"
    path.write_text(path.read_text().replace("image_name", "image_path", 1))
    with pytest.raises(DataError, match=r"train.csv: missing column\(s\) \['image_name'\]"):
        _run(tmp_path / "raw", tmp_path / "ocxr")


def test_paper_protocol_on_the_fixture_says_it_needs_the_full_set(tmp_path: Path) -> None:
    layout.build(tmp_path / "raw")
    with pytest.raises(DataError, match=r"object-cxr-g2d.v1 takes 1600 images for val .*object-cxr-patient"):
        _run(tmp_path / "raw", tmp_path / "ocxr", protocol="object-cxr-g2d")


def test_parse_annotation_real_forms() -> None:
    """Path-valued image names (the README's example), a trailing ';' and corners given in any order."""
    assert object_cxr._file_name("/path/00012.jpg") == "00012.jpg"
    assert object_cxr._file_name("00012.jpg") == "00012.jpg"
    assert object_cxr.parse_annotation("", "w") == []
    assert object_cxr.parse_annotation("0 40 30 8  6;", "w") == [("rectangle", (8.0, 6.0, 40.0, 30.0))]
    assert object_cxr.parse_annotation("2 1 2 3 4 5 6", "w") == [("polygon", (1.0, 2.0, 3.0, 4.0, 5.0, 6.0))]
