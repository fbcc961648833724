"""COVIDx import: the list files in their plain and versioned names, one-hot labels, patients namespaced
by data source, and the errors that name the file and row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from g2d.data import importing
from g2d.data import manifest as mf
from g2d.data.sources import covidx
from g2d.errors import DataError
from tests.layouts import covidx as layout

OPTIONS = importing.Options(image_size=32, workers=1, shard_size=5)
EXPECTED = {"normal": "normal", "pneumonia": "pneumonia", "COVID-19": "covid"}


def _run(raw: Path, out: Path, protocol: str = "covidx-patient", options: importing.Options = OPTIONS):
    return importing.run("covidx", raw, out, protocol, options)


def test_import_fixture_one_hot_labels_and_validates(tmp_path: Path) -> None:
    truth = layout.build(tmp_path / "raw")
    result = _run(tmp_path / "raw", tmp_path / "covidx")
    assert result.rows == 12 and not result.failures and not result.dropped
    assert mf.validate(tmp_path / "covidx").ok
    df = mf.read_manifest(tmp_path / "covidx")
    assert set(df.columns) >= {"normal", "pneumonia", "covid"}
    assert (df[["normal", "pneumonia", "covid"]].sum(axis=1) == 1).all()  # exactly one class per image
    for _, row in df.iterrows():
        assert row[EXPECTED[truth[row["source_id"]]]] == 1
        assert max(Image.open(tmp_path / "covidx" / row["image"]).size) == 32
    # the official test list is the test split; the train list's patients go to train or val whole
    test_files = {f"{stem}.{'png' if k % 2 == 0 else 'jpg'}" for k, (_, stem, _, _) in enumerate(layout.TEST)}
    assert set(df.loc[df["split"] == "test", "source_id"]) == test_files
    assert set(df.loc[df["split"] != "test", "split"]) <= {"train", "val"}
    assert df.groupby("patient_id")["split"].nunique().max() == 1
    # patient "3" of cohen and of sirm are different people
    assert {"cohen:3", "sirm:3"} <= set(df["patient_id"])
    # stem collisions across extensions are impossible: the id is the whole filename
    assert set(df["id"]) == set(truth)
    info = json.loads((tmp_path / "covidx" / "dataset.json").read_text())
    assert info["protocol"]["name"] == "covidx-patient" and info["splits"]["test"] == 3


def test_versioned_list_names_and_three_column_lists(tmp_path: Path) -> None:
    layout.build(tmp_path / "raw", train_name="train_COVIDx9A.txt", test_name="test_COVIDx9A.txt", columns=3)
    result = _run(tmp_path / "raw", tmp_path / "covidx")
    assert result.rows == 12
    df = mf.read_manifest(tmp_path / "covidx")
    assert "3" in set(df["patient_id"])  # no data source column: the raw patient id


def test_ambiguous_list_files_are_named(tmp_path: Path) -> None:
    layout.build(tmp_path / "raw", train_name="train_COVIDx9A.txt")
    (tmp_path / "raw" / "train_COVIDx9B.txt").write_text("1 x.png positive cohen\n")
    with pytest.raises(DataError, match=r"2 candidate train lists \(train_COVIDx9A.txt, train_COVIDx9B.txt\)"):
        _run(tmp_path / "raw", tmp_path / "covidx")


def test_missing_list_file_says_what_the_layout_holds(tmp_path: Path) -> None:
    layout.build(tmp_path / "raw")
    (tmp_path / "raw" / "test.txt").unlink()
    with pytest.raises(DataError, match=r"no test list \(test.txt or test_COVIDx<version>.txt\)"):
        _run(tmp_path / "raw", tmp_path / "covidx")


def test_missing_image_is_a_listed_failure(tmp_path: Path) -> None:
    layout.build(tmp_path / "raw", missing=1)
    result = _run(tmp_path / "raw", tmp_path / "covidx",
                  options=importing.Options(image_size=32, workers=1, max_failures=0.2))
    assert result.rows == 11 and len(result.failures) == 1
    failure = result.failures[0]
    assert failure["file"].endswith("test/MIDRC-RICORD-1C-419639-003251-46647-0.png")
    assert failure["where"].endswith("test.txt row 3") and "does not exist" in failure["error"]


def test_binary_lists_are_refused_with_the_three_class_alternative(tmp_path: Path) -> None:
    layout.build(tmp_path / "raw")
    layout.replace_line(tmp_path / "raw" / "train.txt", 1, "3 SARS-fig8b-day5.jpg negative cohen")
    with pytest.raises(DataError, match=r"train.txt row 2: class 'negative': train.txt is a binary COVIDx list .*"
                                        r"train_COVIDx9A.txt / test_COVIDx9A.txt"):
        _run(tmp_path / "raw", tmp_path / "covidx")


def test_unknown_class_names_file_and_row(tmp_path: Path) -> None:
    layout.build(tmp_path / "raw")
    layout.replace_line(tmp_path / "raw" / "test.txt", 1, "e5f6-0002 e5f6-0002.jpg tuberculosis rsna")
    with pytest.raises(DataError, match=r"test.txt row 2: unknown class 'tuberculosis'"):
        _run(tmp_path / "raw", tmp_path / "covidx")


def test_malformed_line_names_file_and_row(tmp_path: Path) -> None:
    layout.build(tmp_path / "raw")
    layout.replace_line(tmp_path / "raw" / "train.txt", 4, "a1b2c3d4-0001 my image.png normal rsna")
    with pytest.raises(DataError, match=r"train.txt row 5: 5 fields .* 'patient_id filename class \[data_source\]'"):
        _run(tmp_path / "raw", tmp_path / "covidx")


def test_patient_in_both_lists_names_both_files_and_rows(tmp_path: Path) -> None:
    layout.build(tmp_path / "raw")
    layout.replace_line(tmp_path / "raw" / "test.txt", 2,
                        "419639-000025 MIDRC-RICORD-1C-419639-003251-46647-0.png COVID-19 ricord")
    with pytest.raises(DataError, match=r"test.txt row 3: patient '419639-000025' \(ricord\) is also in the train "
                                        r"list at .*train.txt row 8: patient in two splits"):
        _run(tmp_path / "raw", tmp_path / "covidx")


def test_duplicate_filename_names_both_rows(tmp_path: Path) -> None:
    layout.build(tmp_path / "raw")
    layout.replace_line(tmp_path / "raw" / "test.txt", 0, "e5f6-0001 a1b2c3d4-0001.png normal rsna")
    with pytest.raises(DataError, match=r"test.txt row 1: a1b2c3d4-0001.png is listed twice \(also at "
                                        r".*train.txt row 5\)"):
        _run(tmp_path / "raw", tmp_path / "covidx")


def test_paper_protocol_on_the_fixture_says_it_needs_the_full_set(tmp_path: Path) -> None:
    layout.build(tmp_path / "raw")
    with pytest.raises(DataError, match=r"covidx-g2d.v1 takes 5998 images for val from pool 'train'.*covidx-patient"):
        _run(tmp_path / "raw", tmp_path / "covidx", protocol="covidx-g2d")


def test_read_list_parses_the_real_line_format(tmp_path: Path) -> None:
    """Lines as in COVID-Net's labels/test_COVIDx9A.txt and archive/train_split_v1.txt."""
    path = tmp_path / "test_COVIDx9A.txt"
    path.write_text("419639-003251 MIDRC-RICORD-1C-419639-003251-46647-0.png COVID-19 ricord\r\n"
                    "47c78742 47c78742.png normal rsna\n\n"
                    "3 SARS-10.1148rg.242035193-g04mr34g0-Fig8a-day0.jpeg viral\n")
    assert covidx.read_list(path) == [
        (1, "419639-003251", "MIDRC-RICORD-1C-419639-003251-46647-0.png", "covid", "ricord"),
        (2, "47c78742", "47c78742.png", "normal", "rsna"),
        (4, "3", "SARS-10.1148rg.242035193-g04mr34g0-Fig8a-day0.jpeg", "pneumonia", ""),
    ]
