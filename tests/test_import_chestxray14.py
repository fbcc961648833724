"""ChestX-ray14 import: the official layout (Data_Entry table, official lists, images in images_0NN/images/,
the box list), the full-size Data_Entry and box list bundled with torchxrayvision, and the errors naming
the file and row."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from g2d.data import importing, protocols
from g2d.data import manifest as mf
from g2d.data.sources import chestxray14, embedded
from g2d.errors import DataError
from tests.layouts import chestxray14 as layout

OPTIONS = importing.Options(image_size=32, workers=1, shard_size=4)


def _import(src: Path, out: Path, options: importing.Options = OPTIONS) -> importing.ImportResult:
    return importing.run("chestxray14", src, out, None, options)


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_import_fixture_keeps_the_official_lists_labels_and_boxes(tmp_path: Path) -> None:
    src = layout.build(tmp_path / "raw")
    result = _import(src, tmp_path / "out")
    assert result.protocol.name == "chestxray14-official"
    assert result.rows == 10 and not result.failures
    assert result.dropped == {"in neither train_val_list.txt nor test_list.txt": 1}
    assert mf.validate(tmp_path / "out").ok
    df = mf.read_manifest(tmp_path / "out").set_index("id")
    for name, findings, patient, _, pool in layout.ROWS[:-1]:
        row = df.loc[name[:-4]]
        assert row["source_id"] == name and row["patient_id"] == patient
        assert (row["split"] == "test") == (pool == "test")
        positive = {f.lower().replace("no finding", "no_finding") for f in findings.split("|")}
        assert {c: int(row[c]) for c in chestxray14.LABELS} == {c: int(c in positive) for c in chestxray14.LABELS}
    assert df.groupby("patient_id")["split"].nunique().max() == 1
    # boxes: x, y, w, h on the 64 px PNG -> x0, y0, x1, y1 on the stored 32 px copy, labels as the columns
    assert json.loads(df.loc["00000005_000", "boxes"]) == [[5.25, 10.12, 11.25, 14.38, "atelectasis"]]
    assert json.loads(df.loc["00000005_001", "boxes"]) == [[15.0, 2.0, 25.0, 17.0, "infiltration"],
                                                           [1.0, 20.0, 9.0, 28.0, "pneumonia"]]
    assert df["boxes"].ne("").sum() == 2 and "mask" not in df.columns


def test_v2020_table_and_a_flat_images_folder(tmp_path: Path) -> None:
    """The NIH Box download: Data_Entry_2017_v2020.csv and every PNG in images/."""
    src = layout.build(tmp_path / "raw", entries="Data_Entry_2017_v2020.csv", flat=True)
    assert _import(src, tmp_path / "out").rows == 10


def test_a_view_other_than_pa_or_ap_is_dropped_and_counted(tmp_path: Path) -> None:
    src = layout.build(tmp_path / "raw")
    _edit(src / "Data_Entry_2017.csv", "Hernia,0,3,43,F,AP", "Hernia,0,3,43,F,LL")
    result = _import(src, tmp_path / "out")
    assert result.rows == 9 and result.dropped["View Position not PA / AP"] == 1


def test_a_missing_png_is_a_failure_naming_the_table_row(tmp_path: Path) -> None:
    src = layout.build(tmp_path / "raw", missing=("00000003_000.png",))
    result = _import(src, tmp_path / "out", importing.Options(image_size=32, workers=1, max_failures=0.2))
    assert result.rows == 9
    assert result.failures == [{"file": str(src / "images" / "00000003_000.png"),
                                "where": f"{src / 'Data_Entry_2017.csv'} row 5",
                                "error": "image listed here does not exist"}]


def test_unknown_finding_names_the_file_and_row(tmp_path: Path) -> None:
    src = layout.build(tmp_path / "raw")
    _edit(src / "Data_Entry_2017.csv", "Mass|Nodule", "Mass|Nodules")
    with pytest.raises(DataError, match=r"Data_Entry_2017.csv row 7: Finding Labels 'Mass\|Nodules' holds unknown "
                                        r"finding\(s\) \['Nodules'\]; ChestX-ray14 uses Atelectasis, "):
        _import(src, tmp_path / "out")


def test_an_image_in_both_lists_names_both_files(tmp_path: Path) -> None:
    src = layout.build(tmp_path / "raw")
    with open(src / "test_list.txt", "a") as f:
        f.write("00000002_000.png\n")
    with pytest.raises(DataError, match=r"test_list.txt line 5: 00000002_000.png is also in .*train_val_list.txt "
                                        r"line 3; an image belongs to one official list"):
        _import(src, tmp_path / "out")


def test_a_listed_image_without_a_table_row_is_named(tmp_path: Path) -> None:
    src = layout.build(tmp_path / "raw")
    with open(src / "test_list.txt", "a") as f:
        f.write("00099999_000.png\n")
    with pytest.raises(DataError, match=r"test_list.txt line 5: 00099999_000.png has no row in the Data_Entry "
                                        r"table"):
        _import(src, tmp_path / "out")


@pytest.mark.parametrize("old, new, message", [
    ("Infiltrate", "Infiltrates", r"BBox_List_2017.csv row 3: Finding Label 'Infiltrates' is not a ChestX-ray14 "
                                  r"finding"),
    ("30.0,4.0", "30.0,four", r"BBox_List_2017.csv row 3: Bbox \[x, y, w, h\] must be numbers"),
    ("20.0,30.0", "-20.0,30.0", r"BBox_List_2017.csv row 3: box of width -20.0 and height 30.0; neither may be "
                                r"negative"),
    ("00000005_001.png,Infiltrate", "00000009_000.png,Infiltrate", r"BBox_List_2017.csv row 3: '00000009_000.png' "
                                                                   r"has no row in the Data_Entry table"),
])
def test_a_bad_box_row_is_named(tmp_path: Path, old: str, new: str, message: str) -> None:
    src = layout.build(tmp_path / "raw")
    _edit(src / "BBox_List_2017.csv", old, new)
    with pytest.raises(DataError, match=message):
        _import(src, tmp_path / "out")


def test_a_zero_area_box_is_left_out_and_counted(tmp_path: Path) -> None:
    src = layout.build(tmp_path / "raw")
    _edit(src / "BBox_List_2017.csv", "20.0,30.0", "0.0,30.0")
    result = _import(src, tmp_path / "out")
    assert result.dropped["boxes with zero width or height (left out of boxes and masks)"] == 1
    boxes = mf.read_manifest(tmp_path / "out").set_index("id").loc["00000005_001", "boxes"]
    assert json.loads(boxes) == [[1.0, 20.0, 9.0, 28.0, "pneumonia"]]


def test_a_box_outside_the_image_stops_the_import(tmp_path: Path) -> None:
    src = layout.build(tmp_path / "raw")
    _edit(src / "BBox_List_2017.csv", "2.0,40.0,16.0,16.0", "2.0,40.0,16.0,60.0")
    with pytest.raises(DataError, match=r"BBox_List_2017.csv row 4: box .* lies outside the 64 x 64 image"):
        _import(src, tmp_path / "out")


def test_missing_column_names_expected_and_found(tmp_path: Path) -> None:
    src = layout.build(tmp_path / "raw")
    _edit(src / "Data_Entry_2017.csv", "View Position", "View")
    with pytest.raises(DataError, match=r"Data_Entry_2017.csv: missing column\(s\) \['View Position'\]; expected "
                                        r"\['Image Index', 'Finding Labels', 'Patient ID', 'View Position'\], found "
                                        r"\['Image Index', .*'View', 'OriginalImage\[Width', 'Height\]'"):
        _import(src, tmp_path / "out")


def test_missing_table_or_list_is_named(tmp_path: Path) -> None:
    src = layout.build(tmp_path / "raw")
    (src / "test_list.txt").unlink()
    with pytest.raises(DataError, match=r"test_list.txt: missing; ChestX-ray14's official split is"):
        _import(src, tmp_path / "a")
    (src / "Data_Entry_2017.csv").unlink()
    with pytest.raises(DataError, match=r"holds neither Data_Entry_2017_v2020.csv nor Data_Entry_2017.csv"):
        _import(src, tmp_path / "b")


def test_bundled_full_size_tables_parse_and_split_by_patient() -> None:
    """torchxrayvision ships the real Data_Entry_2017_v2020.csv (112,120 images, 30,805 patients) and
    BBox_List_2017.csv (984 boxes on 880 images); the official lists are not bundled, so membership here
    follows a patient rule instead."""
    folder = embedded.package_data_dir()
    entries = chestxray14.read_entries(folder / "Data_Entry_2017_v2020.csv.gz")
    assert len(entries) == 112120 and len({e.patient_id for e in entries.values()}) == 30805
    prevalence = {c: sum(e.labels[c] for e in entries.values()) for c in chestxray14.LABELS}
    assert prevalence["no_finding"] == 60361 and prevalence["infiltration"] == 19894 and prevalence["hernia"] == 227
    assert all(0 < n < len(entries) for n in prevalence.values())
    assert all(sum(e.labels.values()) >= 1 for e in entries.values())  # every image has a finding or No Finding
    boxes = chestxray14.read_boxes(folder / "BBox_List_2017.csv.gz", entries)
    flat = [b for bs in boxes.values() for b in bs]
    assert len(flat) == 984 and len(boxes) == 880
    assert Counter(b[4] for b in flat)["infiltration"] == 123 and {b[4] for b in flat} <= set(chestxray14.LABELS)
    xyxy = np.array([b[:4] for b in flat])
    assert (xyxy >= 0).all() and (xyxy <= 1024).all()  # on the 1024 x 1024 PNGs

    lists = {"train_val": {}, "test": {}}
    for name, entry in entries.items():
        lists["test" if int(entry.patient_id) % 5 == 0 else "train_val"][name] = "rule"
    scan = chestxray14.assemble(entries, lists, boxes, Path)
    assert len(scan.items) == 112120 and not any(i.missing for i in scan.items) and not scan.dropped
    items = scan.items
    placed = protocols.assign(protocols.load("chestxray14-official"), [i.id for i in items],
                              [i.patient_id for i in items], [i.pool for i in items], "bundled")
    counts = Counter(placed.values())
    assert sum(counts.values()) == 112120 and counts["test"] == len(lists["test"])
    split_of_patient: dict[str, set[str]] = {}
    for item in items:
        split_of_patient.setdefault(item.patient_id, set()).add(placed[item.id])
    assert all(len(s) == 1 for s in split_of_patient.values())
    val_patients = sum(s == {"val"} for s in split_of_patient.values())
    train_val_patients = sum(s != {"test"} for s in split_of_patient.values())
    assert val_patients == round(0.1 * train_val_patients)
