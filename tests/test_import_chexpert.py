"""CheXpert import: the official layout (train.csv / valid.csv with Paths relative to the folder above),
the uncertainty policy, the full-size train.csv bundled with torchxrayvision and the errors naming the row."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from g2d.data import importing, protocols
from g2d.data import manifest as mf
from g2d.data.sources import chexpert, chexpert_labels, embedded
from g2d.errors import DataError
from tests.layouts import chexpert as layout

POLICY = {"atelectasis": "ones", "cardiomegaly": "zeros"}
OPTIONS = importing.Options(image_size=32, workers=1, shard_size=4, uncertain=POLICY)
FRONTAL = [layout.image_id(p, s, v) for _, p, s, v, view, _ in layout.ROWS if view == "Frontal"]


def _import(src: Path, out: Path, protocol: str = "chexpert-patient",
            options: importing.Options = OPTIONS) -> importing.ImportResult:
    return importing.run("chexpert", src, out, protocol, options)


def test_import_fixture_applies_the_policy_drops_laterals_and_validates(tmp_path: Path) -> None:
    src = layout.build(tmp_path)
    result = _import(src, tmp_path / "out")
    assert result.rows == 10 and not result.failures
    assert result.dropped == {"lateral views (train.csv)": 2}
    assert mf.validate(tmp_path / "out").ok
    df = mf.read_manifest(tmp_path / "out").set_index("id")
    assert sorted(df.index) == sorted(FRONTAL)
    assert set(df.loc[df["split"] == "test"].index) == {"patient64541_study1_view1_frontal",
                                                        "patient64542_study1_view1_frontal"}
    assert set(df["split"]) <= {"train", "val", "test"} and df.groupby("patient_id")["split"].nunique().max() == 1
    first = df.loc["patient00001_study1_view1_frontal"]
    assert first["patient_id"] == "patient00001" and first["study_id"] == "patient00001/study1"
    assert first["source_id"] == "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    # U-ones for atelectasis, U-zeros for cardiomegaly, the others keep -1; blank stays blank
    assert (first["atelectasis"], first["cardiomegaly"], first["edema"]) == (1, 0, -1)
    assert first["support_devices"] == 1 and pd.isna(first["pneumonia"])
    assert df.loc["patient00004_study1_view1_frontal", "consolidation"] == -1
    for image_id, row in df.iterrows():
        raw = layout.raw_labels(image_id)
        for name in chexpert_labels.LABELS:
            expected = importing.uncertain_value(raw[name], name, POLICY)
            assert (pd.isna(row[name]) and expected is None) or row[name] == expected, (image_id, name)
        assert max(Image.open(tmp_path / "out" / row["image"]).size) == 32
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert info["import"]["uncertain"] == POLICY and info["protocol"]["name"] == "chexpert-patient"


def test_a_renamed_dataset_folder_still_resolves_the_csv_paths(tmp_path: Path) -> None:
    """The CSV's Path starts with CheXpert-v1.0-small/; a copy under another name is found below --src."""
    src = layout.build(tmp_path, folder="chexpert-copy")
    result = _import(src, tmp_path / "out")
    assert result.rows == 10 and not result.failures


def test_a_missing_image_is_a_failure_naming_the_csv_row(tmp_path: Path) -> None:
    src = layout.build(tmp_path, missing=("patient00003_study1_view1_frontal",))
    result = _import(src, tmp_path / "out", options=importing.Options(
        image_size=32, workers=1, uncertain=POLICY, max_failures=0.2))
    assert result.rows == 9
    [failure] = result.failures
    assert failure["where"] == f"{src / 'train.csv'} row 7"  # header line 1, patient00003 frontal is line 7
    assert failure["file"] == str(src / "train/patient00003/study1/view1_frontal.jpg")
    assert failure["error"] == "image listed here does not exist"
    report = json.loads((tmp_path / "out" / importing.REPORT).read_text())
    assert report["failed"] == 1 and report["dropped"] == {"lateral views (train.csv)": 2}


def test_missing_column_names_expected_and_found(tmp_path: Path) -> None:
    src = layout.build(tmp_path)
    path = src / "valid.csv"
    path.write_text(path.read_text().replace("Pleural Effusion", "Effusion", 1))
    with pytest.raises(DataError, match=r"valid.csv: missing column\(s\) \['Pleural Effusion'\]; expected "
                                        r"\['Path', 'Frontal/Lateral', 'No Finding', .*found \['Path', 'Sex', "
                                        r"'Age', .*'Effusion'"):
        _import(src, tmp_path / "out")


def test_missing_valid_csv_is_named(tmp_path: Path) -> None:
    src = layout.build(tmp_path)
    (src / "valid.csv").unlink()
    with pytest.raises(DataError, match=r"valid.csv: missing; the source's official layout has it"):
        _import(src, tmp_path / "out")


@pytest.mark.parametrize("column, cell, message", [
    ("Edema", "2.0", r"train.csv row 4: column 'Edema' holds '2.0'; the labeller writes 1.0, 0.0, -1.0 or blank"),
    ("Frontal/Lateral", "Oblique", r"train.csv row 4: column 'Frontal/Lateral' holds 'Oblique'; CheXpert writes "
                                   r"Frontal or Lateral"),
    ("Path", "CheXpert-v1.0-small/train/p2/view1.jpg", r"train.csv row 4: Path 'CheXpert-v1.0-small/train/p2/"
                                                       r"view1.jpg' is not \.\.\./patientNNNNN/studyN/<view>.jpg"),
])
def test_a_bad_cell_names_the_file_row_and_column(tmp_path: Path, column: str, cell: str, message: str) -> None:
    src = layout.build(tmp_path)
    path = src / "train.csv"
    lines = path.read_text().splitlines()
    cells = lines[3].split(",")
    cells[layout.HEADER.index(column)] = cell
    lines[3] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        _import(src, tmp_path / "out")


def test_the_5x200_protocol_on_a_fixture_says_how_many_it_found(tmp_path: Path) -> None:
    src = layout.build(tmp_path)
    # patient00003 is the only frontal train image with atelectasis positive and the other four negative / blank
    with pytest.raises(DataError, match=r"chexpert import from .*: the subset takes 200 images with only atelectasis "
                                        r"positive, but the source has 1"):
        _import(src, tmp_path / "out", protocol="chexpert-5x200")


def test_bundled_full_size_train_csv_parses_and_splits_to_the_paper_sizes(tmp_path: Path) -> None:
    """torchxrayvision ships CheXpert-v1.0-small's real train.csv (223,414 rows, 191,027 frontal of 64,534 of its
    64,540 patients: six have only lateral views)."""
    items, dropped = chexpert.parse(embedded.package_data_dir() / "chexpert_train.csv.gz", "train")
    assert len(items) == 191027 and dropped == {"lateral views (chexpert_train.csv.gz)": 32387}
    assert len({i.id for i in items}) == len(items) and len({i.patient_id for i in items}) == 64534
    assert Counter(i.labels["cardiomegaly"] for i in items)[-1] > 0  # uncertain stays raw
    valid, _ = chexpert.parse(layout.build(tmp_path) / "valid.csv", "valid")  # not bundled: the fixture's
    both = items + valid
    placed = protocols.assign(protocols.load("chexpert-g2d"), [i.id for i in both], [i.patient_id for i in both],
                              [i.pool for i in both], "bundled")
    assert Counter(placed.values()) == {"train": 186027, "val": 5000, "test": 2}
    # the 5x200 subset on the raw labels, exactly as the engine places it
    protocol = protocols.load("chexpert-5x200")
    kept, gone, missing = importing._place(importing.Scan(items + valid, dropped), protocol, "bundled")
    assert len(kept) == 1000 and {i.pool for i in kept} == {"test"} and not missing
    assert gone["in official partition 'valid', which protocol chexpert-5x200.v1 does not use"] == len(valid)
    assert gone["not in protocol chexpert-5x200.v1's subset"] == 191027 - 1000
    five = protocol.subset.one_of
    assert Counter(next(c for c in five if i.labels[c] == 1) for i in kept) == {c: 200 for c in five}
    assert all(sum(i.labels[c] == 1 for c in five) == 1 and all(i.labels[c] in (1, 0, None) for c in five)
               for i in kept)


def test_unresolved_paths_are_tried_beside_and_inside_src(tmp_path: Path) -> None:
    src = layout.build(tmp_path)
    rel = "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    assert chexpert.locate(src, rel) == tmp_path / rel
    moved = tmp_path / "elsewhere"
    shutil.move(src, moved)
    assert chexpert.locate(moved, rel) == moved / "train/patient00001/study1/view1_frontal.jpg"
    assert chexpert.locate(moved, "CheXpert-v1.0-small/train/patient09999/study1/view1_frontal.jpg") is None
