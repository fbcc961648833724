"""Manifest schema and `g2d data validate`: each kind of bad dataset is found, with its rows."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from g2d.cli import app
from g2d.data import manifest as mf
from g2d.errors import ManifestError

SIZE = 16


def png(path: Path, array: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path.name


def make_dataset(folder: Path, n: int = 4) -> list[dict]:
    rows = []
    for i in range(n):
        image = np.full((SIZE, SIZE), 40 * i, dtype=np.uint8)
        mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
        mask[4:8, 4:8] = 255
        png(folder / "images" / f"r{i}.png", image)
        png(folder / "masks" / f"r{i}.png", mask)
        rows.append({"id": f"r{i}", "image": f"images/r{i}.png", "patient_id": f"p{i}", "study_id": f"s{i}",
                     "split": ["train", "train", "val", "test"][i], "report": f"report {i}",
                     "mask": f"masks/r{i}.png", "boxes": [[4, 4, 8, 8, "opacity"]], "opacity": i % 2})
    mf.write_manifest(rows, folder)
    return rows


def problems(folder: Path) -> dict[str, list[int]]:
    report = mf.validate(folder)
    out: dict[str, list[int]] = {}
    for p in report.problems:
        out.setdefault(p.check, []).extend(p.rows)
    return out


def test_clean_dataset_has_no_problems_and_round_trips(tmp_path):
    rows = make_dataset(tmp_path)
    assert mf.validate(tmp_path).ok
    df = mf.read_manifest(tmp_path)
    assert list(df["id"]) == [r["id"] for r in rows]
    assert json.loads(df.loc[0, "boxes"]) == [[4, 4, 8, 8, "opacity"]]
    assert list(df["opacity"]) == [0, 1, 0, 1]


def test_write_is_byte_deterministic(tmp_path):
    make_dataset(tmp_path / "a")
    make_dataset(tmp_path / "b")
    assert (tmp_path / "a" / mf.MANIFEST).read_bytes() == (tmp_path / "b" / mf.MANIFEST).read_bytes()
    assert mf.dataset_hash(tmp_path / "a") == mf.dataset_hash(tmp_path / "b")


def test_hash_changes_with_any_referenced_file(tmp_path):
    make_dataset(tmp_path)
    before = mf.dataset_hash(tmp_path)
    png(tmp_path / "masks" / "r1.png", np.zeros((SIZE, SIZE), dtype=np.uint8))
    assert mf.dataset_hash(tmp_path) != before


def rewrite(folder: Path, change) -> None:
    df = mf.read_manifest(folder)
    change(df)
    mf.write_manifest(df, folder)


def test_missing_file(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "images" / "r2.png").unlink()
    (tmp_path / "masks" / "r3.png").unlink()
    assert problems(tmp_path) == {"missing file": [4, 5]}


def test_undecodable_truncated_and_empty_images(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "images" / "r0.png").write_bytes(b"not a png at all")
    data = (tmp_path / "images" / "r1.png").read_bytes()
    (tmp_path / "images" / "r1.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "images" / "r2.png").write_bytes(b"")
    assert problems(tmp_path) == {"undecodable image": [2, 3, 4]}


def test_mask_not_binary_and_wrong_size(tmp_path):
    make_dataset(tmp_path)
    png(tmp_path / "masks" / "r1.png", np.arange(SIZE * SIZE, dtype=np.uint8).reshape(SIZE, SIZE))
    png(tmp_path / "masks" / "r2.png", np.zeros((SIZE, SIZE + 1), dtype=np.uint8))
    assert problems(tmp_path) == {"mask not binary": [3], "mask size": [4]}


def test_box_outside_and_malformed(tmp_path):
    make_dataset(tmp_path)

    def change(df):
        df.loc[0, "boxes"] = json.dumps([[10, 10, SIZE + 5, 12, "opacity"]])
        df.loc[1, "boxes"] = json.dumps([[8, 8, 4, 4, "opacity"]])
        df.loc[2, "boxes"] = "[[1, 2"

    rewrite(tmp_path, change)
    assert problems(tmp_path) == {"box outside the image": [2], "bad boxes": [3, 4]}
    messages = {p.message for p in mf.validate(tmp_path).problems}
    assert {"a box needs x0 < x1 and y0 < y1", "boxes is not valid JSON"} < messages


def test_patient_in_two_splits(tmp_path):
    make_dataset(tmp_path)
    rewrite(tmp_path, lambda df: df.__setitem__("patient_id", ["p0", "p0", "p2", "p2"]))
    found = mf.validate(tmp_path).problems
    assert {p.check for p in found} == {"patient in two splits"}
    assert sorted(r for p in found for r in p.rows) == [4, 5]
    assert "patient 'p2' is in ['test', 'val']" in str(found[0]) + str(found[-1])


def test_empty_report_and_duplicates(tmp_path):
    make_dataset(tmp_path)

    def change(df):
        df.loc[1, "report"] = "   "
        df.loc[3, "id"] = "r2"
        df.loc[3, "image"] = "images/r2.png"

    rewrite(tmp_path, change)
    assert problems(tmp_path) == {"empty report": [3], "duplicate rows": [5]}  # one row, counted once


def test_paths_that_leave_the_dataset(tmp_path):
    make_dataset(tmp_path)

    def change(df):
        df.loc[0, "image"] = "../outside.png"
        df.loc[1, "mask"] = "/etc/passwd"

    rewrite(tmp_path, change)
    assert problems(tmp_path) == {"path leaves the dataset": [2, 3]}
    with pytest.raises(ManifestError, match=r"'../x.png' must be relative to the dataset folder, without '..'"):
        mf.resolve(tmp_path, "../x.png", "image")


def test_bad_labels_missing_patients_boxes_without_label_and_rgb_masks_are_listed(tmp_path):
    make_dataset(tmp_path)

    def change(df):
        df["opacity"] = df["opacity"].astype("string")
        df.loc[2, "opacity"] = "2"
        df.loc[1, "patient_id"] = ""
        df.loc[0, "boxes"] = json.dumps([[1, 1, 4, 4]])
        df.loc[3, "boxes"] = json.dumps([[True, 1, 4, 4, "x"]])

    rewrite(tmp_path, change)
    png(tmp_path / "masks" / "r2.png", np.zeros((SIZE, SIZE, 3), dtype=np.uint8))
    assert problems(tmp_path) == {"bad label": [4], "missing patient id": [3], "bad boxes": [2, 5],
                                  "mask not binary": [4]}


def test_empty_manifest_is_a_problem(tmp_path):
    make_dataset(tmp_path)
    mf.write_manifest(mf.read_manifest(tmp_path).iloc[:0], tmp_path)
    report = mf.validate(tmp_path)
    assert [p.check for p in report.problems] == ["empty manifest"]


def test_a_dataset_is_a_folder_or_its_manifest_csv(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "other.csv").write_text("id,image\n")
    with pytest.raises(ManifestError, match=r"other.csv: a dataset is a folder holding manifest.csv"):
        mf.validate(tmp_path / "other.csv")
    assert mf.validate(tmp_path / "manifest.csv").ok
    (tmp_path / "images" / "r1.png").unlink()
    with pytest.raises(ManifestError, match=r"names images/r1.png, which is missing; run `g2d data validate"):
        mf.dataset_hash(tmp_path)


def test_bad_label_values_and_missing_columns(tmp_path):
    make_dataset(tmp_path)
    rewrite(tmp_path, lambda df: df.__setitem__("opacity", ["1", "0", "2", ""]))
    with pytest.raises(ManifestError, match=r"label column 'opacity' must hold 1, 0, -1 or empty; rows 4 hold \['2'\]"):
        mf.read_manifest(tmp_path)
    (tmp_path / mf.MANIFEST).write_text("image,split\na.png,train\n")
    with pytest.raises(ManifestError, match=r"missing required column\(s\) \['id'\]"):
        mf.read_manifest(tmp_path)
    with pytest.raises(ManifestError, match=r"no manifest here"):
        mf.read_manifest(tmp_path / "nowhere")


def test_cli_validate_lists_rows_counts_and_exits_nonzero(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "images" / "r2.png").unlink()
    png(tmp_path / "masks" / "r1.png", np.arange(SIZE * SIZE, dtype=np.uint8).reshape(SIZE, SIZE))
    result = CliRunner().invoke(app, ["data", "validate", str(tmp_path)])
    assert result.exit_code == 1
    assert "missing file: 1 x image file does not exist (rows 4)" in result.output
    assert "mask not binary: 1 x" in result.output
    assert "1 mask not binary, 1 missing file" in result.output


def test_cli_info(tmp_path):
    make_dataset(tmp_path)
    result = CliRunner().invoke(app, ["data", "info", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["rows"] == 4 and info["splits"] == {"train": 2, "val": 1, "test": 1}
    assert info["prevalence"] == {"opacity": 0.5}
    assert info["sha256"] == mf.dataset_hash(tmp_path)


def test_fraction_files_are_checked_against_dataset_json(tmp_path):
    from g2d.data import splits

    make_dataset(tmp_path)
    mf.write_info(tmp_path, {"fractions": splits.write_fractions(tmp_path, {0.5: ["r0"], 1.0: ["r0", "r1"]})})
    assert mf.validate(tmp_path).ok
    (tmp_path / "fractions" / "train_0.5.txt").write_text("r0\nr3\n")  # edited, and r3 is a test row
    (tmp_path / "fractions" / "train_1.txt").unlink()
    messages = sorted(p.message for p in mf.validate(tmp_path).problems)
    assert messages == ["fraction 0.5 (fractions/train_0.5.txt): 1 ids not in the train split, e.g. 'r3'",
                        "fraction 0.5 (fractions/train_0.5.txt): sha256 differs from dataset.json",
                        "fraction 1 (fractions/train_1.txt): file is missing"]


def test_worker_processes_find_the_same_problems_in_the_same_rows(tmp_path):
    make_dataset(tmp_path, n=4)
    df = mf.read_manifest(tmp_path)
    rows = df.to_dict("records")
    for i in range(4, 200):  # enough rows for several worker chunks
        row = dict(rows[i % 4], id=f"r{i}", image=f"images/r{i}.png", patient_id=f"p{i}")
        png(tmp_path / "images" / f"r{i}.png", np.full((SIZE, SIZE), i % 250, dtype=np.uint8))
        if i % 37 == 0:
            row["boxes"] = json.dumps([[0, 0, 99, 4, "opacity"]])  # outside
        if i % 53 == 0:
            (tmp_path / "images" / f"r{i}.png").write_bytes(b"not a png")
        rows.append(row)
    mf.write_manifest(rows, tmp_path)
    one, two = mf.validate(tmp_path, workers=1), mf.validate(tmp_path, workers=2)
    assert [(p.check, p.message, p.rows) for p in one.problems] == [(p.check, p.message, p.rows) for p in two.problems]
    assert one.counts() == {"box outside the image": 5, "undecodable image": 3}
    assert mf.dataset_hash(tmp_path, workers=1) == mf.dataset_hash(tmp_path, workers=3)
