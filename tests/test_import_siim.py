"""SIIM-ACR import: official layout fixture, the full-size RLE file bundled with torchxrayvision, and the
errors that name the file and row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from g2d.data import importing, protocols
from g2d.data import manifest as mf
from g2d.data.sources import embedded, siim
from g2d.errors import DataError
from tests.layouts import siim as layout

OPTIONS = importing.Options(image_size=32, workers=1, shard_size=5)


def test_import_fixture_merges_rows_and_validates(tmp_path: Path) -> None:
    truth = layout.build(tmp_path / "raw", n=12, size=64)
    result = importing.run("siim", tmp_path / "raw", tmp_path / "siim", "siim-patient", OPTIONS)
    assert result.rows == 12 and not result.failures
    df = mf.read_manifest(tmp_path / "siim")
    assert mf.validate(tmp_path / "siim").ok
    assert set(df["split"]) <= {"train", "val", "test"}
    for _, row in df.iterrows():
        mask = np.asarray(Image.open(tmp_path / "siim" / row["mask"])) > 127
        expected = importing.downsample_mask(truth[row["id"]], (32, 32))
        np.testing.assert_array_equal(mask, expected)  # both rows of an image merged, column-major decoded
        assert row["pneumothorax"] == int(truth[row["id"]].any())
        assert Image.open(tmp_path / "siim" / row["image"]).size == (32, 32)
    assert df["image"].str.match(r"images/0000[0-2]/").all()  # shards of 5
    info = json.loads((tmp_path / "siim" / "dataset.json").read_text())
    assert info["protocol"]["name"] == "siim-patient" and info["protocol"]["sha256"] == result.protocol.sha256
    assert info["sha256"] == mf.dataset_hash(tmp_path / "siim")
    # patients (two images each) never straddle splits
    assert df.groupby("patient_id")["split"].nunique().max() == 1


def test_downsampled_masks_keep_half_covered_pixels_and_small_lesions() -> None:
    full = np.zeros((8, 8), dtype=bool)
    full[0:2, 0:3] = True  # 2 x 3 px: stored pixel (0, 0) fully covered, (0, 1) half covered
    np.testing.assert_array_equal(np.argwhere(importing.downsample_mask(full, (4, 4))), [[0, 0], [0, 1]])
    tiny = np.zeros((8, 8), dtype=bool)
    tiny[5, 5] = True  # a quarter of a stored pixel: kept rather than lost
    assert np.argwhere(importing.downsample_mask(tiny, (4, 4))).tolist() == [[2, 2]]
    assert not importing.downsample_mask(np.zeros((8, 8), dtype=bool), (4, 4)).any()


def test_monochrome1_is_inverted_in_the_stored_copy(tmp_path: Path) -> None:
    layout.build(tmp_path / "raw", n=3, size=64)
    importing.run("siim", tmp_path / "raw", tmp_path / "siim", "siim-patient", OPTIONS)
    df = mf.read_manifest(tmp_path / "siim").set_index("source_id")
    images = [np.asarray(Image.open(tmp_path / "siim" / df.iloc[i]["image"]), dtype=float) for i in range(3)]
    # the same gradient runs dark -> bright top to bottom in MONOCHROME2; image 1 is stored MONOCHROME1
    top_minus_bottom = [im[:4].mean() - im[-4:].mean() for im in images]
    assert top_minus_bottom[0] < 0 and top_minus_bottom[2] < 0 and top_minus_bottom[1] > 0


def test_missing_dicoms_are_listed_and_the_threshold_fails_the_import(tmp_path: Path) -> None:
    layout.build(tmp_path / "raw", n=10, size=64, missing=1)
    ok = importing.run("siim", tmp_path / "raw", tmp_path / "a", "siim-patient",
                       importing.Options(image_size=32, workers=1, max_failures=0.1))
    lines = (tmp_path / "raw" / "train-rle.csv").read_text().splitlines()
    line = 1 + next(k for k, text in enumerate(lines) if text.startswith(ok.failures[0]["file"].split("/")[-1][:-4]))
    assert len(ok.failures) == 1 and ok.failures[0]["where"].endswith(f"train-rle.csv row {line}")
    report = json.loads((tmp_path / "a" / importing.REPORT).read_text())
    assert report["failed"] == 1 and report["failures"][0]["error"].startswith("DICOM of this ImageId")
    with pytest.raises(DataError, match=r"1 of 11 images failed to import .*import_report.json"):
        importing.run("siim", tmp_path / "raw", tmp_path / "b", "siim-patient",
                      importing.Options(image_size=32, workers=1, max_failures=0.05))


def test_corrupt_dicom_is_a_failure_naming_the_file(tmp_path: Path) -> None:
    layout.build(tmp_path / "raw", n=6, size=64)
    bad = sorted((tmp_path / "raw").rglob("*.dcm"))[0]
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    result = importing.run("siim", tmp_path / "raw", tmp_path / "siim", "siim-patient",
                           importing.Options(image_size=32, workers=1, max_failures=0.5))
    assert [f["file"] for f in result.failures] == [str(bad)]
    assert mf.read_manifest(tmp_path / "siim").shape[0] == 5


@pytest.mark.parametrize("rle, message", [
    ("1 2 x", "not a list of integers"),
    ("1 2 3", "odd number of values"),
    ("5 2000000", "leave the 1024 x 1024 image"),
])
def test_malformed_rle_names_the_row(tmp_path: Path, rle: str, message: str) -> None:
    layout.build(tmp_path / "raw", n=4, size=64)
    csv_path = tmp_path / "raw" / "train-rle.csv"
    lines = csv_path.read_text().splitlines()
    image_id = lines[3].split(",")[0]
    lines[3] = f"{image_id}, {rle}"
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"train-rle.csv row 4: EncodedPixels .*{message}"):
        importing.run("siim", tmp_path / "raw", tmp_path / "siim", "siim-patient", OPTIONS)


def test_missing_column_names_expected_and_found(tmp_path: Path) -> None:
    layout.build(tmp_path / "raw", n=3, size=64)
    csv_path = tmp_path / "raw" / "train-rle.csv"
    csv_path.write_text(csv_path.read_text().replace("EncodedPixels", "Pixels", 1))
    with pytest.raises(DataError, match=r"train-rle.csv: missing column\(s\) \['EncodedPixels'\]; expected "
                                        r"\['ImageId', 'EncodedPixels'\], found \['ImageId', 'Pixels'\]"):
        importing.run("siim", tmp_path / "raw", tmp_path / "siim", "siim-patient", OPTIONS)


def test_paper_protocol_on_a_subset_says_which_protocol_fits(tmp_path: Path) -> None:
    layout.build(tmp_path / "raw", n=6, size=64)
    with pytest.raises(DataError, match=r"siim-g2d.v1 takes 1807 images for val .* siim-patient"):
        importing.run("siim", tmp_path / "raw", tmp_path / "siim", "siim-g2d", OPTIONS)


def test_bundled_full_size_rle_file_parses_and_splits_to_the_paper_sizes() -> None:
    """torchxrayvision ships SIIM's real train-rle.csv (12,954 rows, 12,047 images)."""
    path = embedded.package_data_dir() / embedded.SIIM_RLE.name
    table = siim.read_rle_table(path)
    assert len(table) == 12047 and sum(map(len, table.values())) == 12954
    positives = 0
    for image_id, rles in table.items():
        for rle in rles:
            siim.check_rle(rle, image_id)
            assert siim.decode_rle(rle).any() == (rle != "-1")  # every run decodes inside 1024 x 1024
        positives += any(rle != "-1" for rle in rles)
    assert 2000 < positives < 3500  # SIIM: about 22% of images have a pneumothorax
    ids = sorted(table)
    placed = protocols.assign(protocols.load("siim-g2d"), ids, ids, ["train"] * len(ids), "bundled")
    counts = {s: list(placed.values()).count(s) for s in ("train", "val", "test")}
    assert counts == {"train": 8433, "val": 1807, "test": 1807}
