"""Bad inputs in the data layer (issue 8, item 2): each is refused or listed with a message that names the
file or the row / id and says what fixes it.

- corrupt, truncated and zero-byte DICOMs, PNGs and JPGs: read by `images.read_image`, listed by
  `manifest.validate`, and refused by the readers the datasets use (`packed.read_resized`, `labelled.open_resized`);
- NaN / inf pixels: the formats that can hold them (float TIFF, float DICOM pixel data, a DICOM rescale that
  overflows);
- report text that is empty or not ASCII, and a manifest that is not UTF-8;
- paths that leave the dataset folder; masks that are not binary or not the image's size.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from g2d.data import images, importing, labelled, packed, text
from g2d.data import manifest as mf
from g2d.data.pairs import PairDataset
from g2d.errors import DataError, ImageError, ManifestError
from tests.layouts import write_dicom

SIZE = 16
RECOPY = "re-copy or re-download it"


def _gradient(rows: int = SIZE, cols: int = SIZE) -> np.ndarray:
    return np.linspace(100, 4000, rows * cols).round().astype(np.uint16).reshape(rows, cols)


def _picture(path: Path, fmt: str) -> Path:
    """A noisy 8-bit picture (noise: a JPG whose data is long enough to cut inside)."""
    pixels = np.random.default_rng(0).integers(0, 256, (SIZE * 4, SIZE * 4), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def _cut(path: Path, keep: int) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


def _pixel_offset(path: Path) -> int:
    """Where a native DICOM's pixel data starts (it is the file's last element)."""
    return path.stat().st_size - len(pydicom.dcmread(path).PixelData)


# ------------------------------------------------------------------ bad files, one kind at a time

def _bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (a bad file, the regex its read_image message must match, after the file's name)."""
    folder.mkdir(parents=True, exist_ok=True)
    dcm = write_dicom(folder / "whole.dcm", _gradient(32, 32))  # pixel data longer than the header: half is inside
    data, start = dcm.read_bytes(), _pixel_offset(dcm)
    files = {
        "dicom zero-byte": (folder / "zero.dcm", b"", r" is empty \(0 bytes\); " + RECOPY),
        "dicom corrupt": (folder / "random.dcm", np.random.default_rng(1).bytes(3000),
                          r" is not a DICOM file: no DICOM elements found \(3000 bytes\); is it a DICOM, PNG or JPG\? "
                          r"re-copy or re-export it"),
        "dicom cut in its header": (folder / "cut_header.dcm", data[:start // 2],
                                    r" has no pixel data, though its header is an image's: the file is cut short "
                                    rf"\({start // 2} bytes\); " + RECOPY),
        "dicom cut in its pixel data": (folder / "cut_pixels.dcm", data[:start + 100],
                                        r" is cut short: its pixel data ends early \(100 of the 2048 bytes a 32 x 32 x "
                                        r"16-bit image needs\); " + RECOPY),
        "dicom cut in half": (folder / "half.dcm", data[:len(data) // 2],
                              rf" is cut short: its pixel data ends early \({len(data) // 2 - start} of the 2048 bytes"
                              r" a 32 x 32 x 16-bit image needs\); " + RECOPY),
    }
    for fmt, suffix in (("PNG", "png"), ("JPEG", "jpg")):
        whole = _picture(folder / f"whole.{suffix}", fmt).read_bytes()
        files |= {
            f"{suffix} zero-byte": (folder / f"zero.{suffix}", b"", r" is empty \(0 bytes\); " + RECOPY),
            f"{suffix} corrupt": (folder / f"random.{suffix}", np.random.default_rng(2).bytes(3000),
                                  r" is corrupt or not an image: cannot decode it \(no image format recognised\); "
                                  r"is it a DICOM, PNG or JPG\? re-copy or re-export it"),
            f"{suffix} cut in half": (folder / f"half.{suffix}", whole[:len(whole) // 2],
                                      r" is cut short \(.*[Tt]runcated.*\); " + RECOPY),
        }
    out = {}
    for name, (path, content, message) in files.items():
        path.write_bytes(content)
        out[name] = (path, message)
    return out


BAD = ["dicom zero-byte", "dicom corrupt", "dicom cut in its header", "dicom cut in its pixel data",
       "dicom cut in half", "png zero-byte", "png corrupt", "png cut in half", "jpg zero-byte", "jpg corrupt",
       "jpg cut in half"]


@pytest.mark.parametrize("name", BAD)
def test_read_image_names_the_file_and_the_fix(tmp_path: Path, name: str) -> None:
    path, message = _bad_files(tmp_path)[name]
    with pytest.raises(ImageError, match=re.escape(str(path)) + message):
        images.read_image(path)
    with pytest.raises(ImageError, match=re.escape(str(path)) + message):
        images.read_gray8(path)  # the datasets' reader says the same


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # pydicom, on a UID cut short
def test_a_truncated_dicom_is_caught_wherever_it_is_cut(tmp_path: Path) -> None:
    dcm = write_dicom(tmp_path / "whole.dcm", _gradient())
    data = dcm.read_bytes()
    for keep in range(1, len(data), 7):
        cut = tmp_path / "cut.dcm"
        cut.write_bytes(data[:keep])
        with pytest.raises(ImageError) as caught:
            images.read_image(cut)
        assert str(cut) in str(caught.value)
        assert caught.value.fix.startswith(("re-copy", "is it a DICOM")), (keep, str(caught.value))


def test_non_image_dicom_says_so(tmp_path: Path) -> None:
    sr = write_dicom(tmp_path / "sr.dcm", _gradient())
    ds = pydicom.dcmread(sr)
    del ds.PixelData, ds.Rows, ds.Columns
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.save_as(sr, enforce_file_format=True)
    with pytest.raises(ImageError, match=re.escape(str(sr)) + r" has no pixel data: it is a Basic Text SR Storage, "
                       r"not an image; export the image itself"):
        images.read_image(sr)


def _dataset(folder: Path, image_files: dict[str, Path]) -> None:
    """A manifest with one row per image file (copied into the dataset folder)."""
    rows = []
    for k, (name, src) in enumerate(image_files.items()):
        rel = f"images/{k:02d}{src.suffix}"
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(src.read_bytes())
        rows.append({"id": name.replace(" ", "_"), "image": rel, "patient_id": f"p{k}", "split": "train",
                     "report": "FINDINGS: Clear lungs."})
    mf.write_manifest(rows, folder)


def test_validate_lists_each_bad_file_with_its_cause_and_fix(tmp_path: Path) -> None:
    bad = _bad_files(tmp_path / "raw")
    good = {"good dicom": write_dicom(tmp_path / "raw" / "good.dcm", _gradient()),
            "good png": _picture(tmp_path / "raw" / "good.png", "PNG"),
            "good jpg": _picture(tmp_path / "raw" / "good.jpg", "JPEG")}
    _dataset(tmp_path / "ds", good | {name: bad[name][0] for name in BAD})
    report = mf.validate(tmp_path / "ds")
    line = {name.replace(" ", "_"): k + 2 for k, name in enumerate([*good, *BAD])}  # CSV line of each row
    found = {r: p.message for p in report.problems for r in p.rows}
    assert {p.check for p in report.problems} == {"undecodable image"}
    assert set(found) == {line[n.replace(" ", "_")] for n in BAD}  # the good DICOM, PNG and JPG pass
    expect = {
        "dicom_zero-byte": "image is empty (0 bytes); " + RECOPY,
        "png_zero-byte": "image is empty (0 bytes); " + RECOPY,
        "dicom_corrupt": "image is not a DICOM file: no DICOM elements found; is it a DICOM, PNG or JPG? re-copy or "
                         "re-export it",
        "png_corrupt": "image is corrupt or not an image: cannot decode it; is it a DICOM, PNG or JPG? re-copy or "
                       "re-export it",
        "dicom_cut_in_its_header": "image has no pixel data, though its header is an image's: the file is cut short; "
                                   + RECOPY,
        "dicom_cut_in_its_pixel_data": "image is cut short: its pixel data ends early; " + RECOPY,
        "png_cut_in_half": "image is cut short; " + RECOPY,
        "jpg_cut_in_half": "image is cut short; " + RECOPY,
    }
    for row_id, message in expect.items():
        assert found[line[row_id]] == message, row_id
    # per-file numbers stay out of the message, so many files with one cause are one problem listing their rows
    cut = next(p for p in report.problems if p.message == "image is cut short; " + RECOPY)
    assert cut.rows == [line["png_cut_in_half"], line["jpg_cut_in_half"]]
    assert str(cut) == f"undecodable image: 2 x image is cut short; {RECOPY} (rows {cut.rows[0]}, {cut.rows[1]})"


def test_validate_reads_dicoms_the_way_the_datasets_do(tmp_path: Path) -> None:
    """A DICOM named by a manifest is decoded (not refused as 'not a PNG'), and its mask is checked against
    the DICOM's size."""
    dcm = write_dicom(tmp_path / "raw" / "a.dcm", _gradient(SIZE, SIZE + 4))
    _dataset(tmp_path / "ds", {"a": dcm})
    assert mf.validate(tmp_path / "ds").ok
    Image.fromarray(np.zeros((SIZE, SIZE), dtype=np.uint8)).save(tmp_path / "ds" / "mask.png")
    df = mf.read_manifest(tmp_path / "ds")
    df["mask"] = ["mask.png"]
    mf.write_manifest(df, tmp_path / "ds")
    assert mf.validate(tmp_path / "ds").counts() == {"mask size": 1}


# ------------------------------------------------------------------ what the datasets read

def test_datasets_read_dicoms_and_refuse_bad_files_naming_them(tmp_path: Path) -> None:
    bad = _bad_files(tmp_path / "raw")
    dcm = write_dicom(tmp_path / "raw" / "good.dcm", _gradient())
    _dataset(tmp_path / "ds", {"good": dcm, "cut": bad["dicom cut in its pixel data"][0],
                               "empty": bad["png zero-byte"][0]})
    folder = tmp_path / "ds"
    expected = images.to_uint8(images.read_image(dcm))
    np.testing.assert_array_equal(np.asarray(packed.read_resized(folder, "images/00.dcm", SIZE)), expected)
    image, w, h = labelled.open_resized(folder, "images/00.dcm", "row good", SIZE, Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(image, expected)
    assert (w, h) == (SIZE, SIZE)

    dataset = PairDataset(folder, "train", SIZE)
    assert dataset[0]["image"].shape == (1, SIZE, SIZE)
    with pytest.raises(DataError, match=re.escape(str(folder / "images/01.dcm")) + r" is cut short: its pixel data "
                       r"ends early \(.*\); re-copy or re-download it; `g2d data validate .*` lists every bad file"):
        dataset[1]
    with pytest.raises(DataError, match=r"^row empty: image .*images/02\.png is empty \(0 bytes\); re-copy or "
                       r"re-download it; `g2d data validate"):
        labelled.open_resized(folder, "images/02.png", "row empty", SIZE, Image.Resampling.BILINEAR)


def test_sixteen_bit_pngs_are_scaled_not_clipped_for_training(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, SIZE * SIZE).round().astype(np.uint16).reshape(SIZE, SIZE)
    Image.fromarray(ramp).save(tmp_path / "r.png")
    gray = np.asarray(images.read_gray8(tmp_path / "r.png"))
    np.testing.assert_array_equal(gray, images.to_uint8(ramp / 65535))  # Pillow's convert("L") clips at 255
    assert gray.max() == 255 and (gray == 255).sum() == 1


def test_zero_one_masks_are_masks_in_training(tmp_path: Path) -> None:
    """validate accepts 0/1 masks as binary, so the readers must not read them as empty (threshold > 127)."""
    folder = tmp_path / "ds"
    rows = []
    for k, top in enumerate((1, 255)):
        image, mask = np.full((SIZE, SIZE), 90, dtype=np.uint8), np.zeros((SIZE, SIZE), dtype=np.uint8)
        mask[4:8, 4:8] = top
        (folder / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / "images" / f"{k}.png")
        Image.fromarray(mask).save(folder / "images" / f"{k}_mask.png")
        rows.append({"id": f"r{k}", "image": f"images/{k}.png", "patient_id": f"p{k}", "split": "test",
                     "mask": f"images/{k}_mask.png", "pneumothorax": 1})
    mf.write_manifest(rows, folder)
    assert mf.validate(folder).ok
    from g2d.data import tasks

    spec = tasks.get("siim-seg")
    split = labelled.load_split(folder, mf.read_manifest(folder), "test", spec, SIZE)
    assert split.masks.sum(dim=(1, 2, 3)).tolist() == [16, 16]


# ------------------------------------------------------------------ NaN / inf pixels

def _float_tiff(path: Path, values: list[float]) -> Path:
    arr = np.resize(np.array(values, dtype=np.float32), (4, 4))
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode == "F"
    return path


def _float_dicom(path: Path, values: np.ndarray) -> Path:
    ds = pydicom.dcmread(write_dicom(path, _gradient(4, 4)))
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = 32
    ds.FloatPixelData = values.astype(np.float32).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_non_finite_pixels_in_each_format_that_can_hold_them(tmp_path: Path) -> None:
    """Pillow reads float TIFFs (mode F); pydicom reads Float Pixel Data; any DICOM's rescale can overflow.
    8-bit and 16-bit PNG / JPG and integer DICOMs cannot hold NaN or inf."""
    finite = _float_tiff(tmp_path / "finite.tif", [0.0, 0.25, 1.5, 3.0])
    np.testing.assert_allclose(images.read_image(finite).ravel()[:4], [0, 0.25 / 3, 0.5, 1], atol=1e-6)

    nan_tiff = _float_tiff(tmp_path / "nan.tif", [0.0, np.nan, 1.0, np.inf])
    with pytest.raises(ImageError, match=re.escape(str(nan_tiff)) + r" holds NaN or inf pixels \(4 NaN and 4 inf of "
                       r"16 pixels\); re-export it with finite values, or remove its row"):
        images.read_image(nan_tiff)
    with pytest.raises(ImageError, match="holds NaN or inf pixels"):
        images.read_gray8(nan_tiff)  # Pillow's own convert("L") would turn NaN into black silently

    values = np.resize(np.array([0.0, np.nan, 0.5, 1.0]), (4, 4))
    nan_dicom = _float_dicom(tmp_path / "nan.dcm", values)
    with pytest.raises(ImageError, match=re.escape(str(nan_dicom)) + r" holds NaN or inf pixels \(4 NaN and 0 inf "
                       r"of 16 pixels\); re-export it with finite values, or remove its row"):
        images.read_image(nan_dicom)
    ok = _float_dicom(tmp_path / "ok.dcm", np.resize(np.array([0.0, 1.0, 0.5, 2.0]), (4, 4)))
    np.testing.assert_allclose(images.read_image(ok).ravel()[:4], [0, 0.5, 0.25, 1])

    overflow = write_dicom(tmp_path / "slope.dcm", _gradient(4, 4), RescaleSlope="1e308", RescaleIntercept=0)
    with pytest.raises(ImageError, match=re.escape(str(overflow)) + r" holds NaN or inf values after its Rescale "
                       r"Slope / Intercept \(0 NaN and 16 inf of 16 pixels\); fix those tags \(slope 1e308, "
                       r"intercept 0.0\) or re-export it"):
        images.read_image(overflow)  # before: inf - inf scaled to a black image, silently

    _dataset(tmp_path / "ds", {"finite": finite, "nan_tiff": nan_tiff, "nan_dicom": nan_dicom,
                               "overflow": overflow})
    problems = {p.message: p.rows for p in mf.validate(tmp_path / "ds").problems}
    assert problems == {
        "image holds NaN or inf pixels; re-export it with finite values, or remove its row": [3, 4],
        "image holds NaN or inf values after its Rescale Slope / Intercept; fix those tags (slope 1e308, intercept "
        "0.0) or re-export it": [5],
    }
    assert mf.validate(tmp_path / "ds").counts() == {"non-finite pixels": 3}


# ------------------------------------------------------------------ report text and the manifest's encoding

def _reports(folder: Path, reports: list[str]) -> None:
    rows = []
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for k, report in enumerate(reports):
        Image.fromarray(np.full((SIZE, SIZE), 50, dtype=np.uint8)).save(folder / "images" / f"{k}.png")
        rows.append({"id": f"r{k}", "image": f"images/{k}.png", "patient_id": f"p{k}", "split": "train",
                     "report": report})
    mf.write_manifest(rows, folder)


def test_empty_and_non_ascii_reports_name_the_row_the_character_and_the_fix(tmp_path: Path) -> None:
    _reports(tmp_path, ["FINDINGS: Clear.", "  ", "FINDINGS: No effusion \u2013 stable.", "Caf\u00e9 au lait.",
                        "FINDINGS: Size \u2013 normal.", "FINDINGS: No pneumothorax. IMPRESSION: Normal \u00c3\u00a9"
                        "chographie."])
    problems = {p.check: [] for p in mf.validate(tmp_path).problems}
    for p in mf.validate(tmp_path).problems:
        problems[p.check].append((p.message, p.rows))
    assert problems["empty report"] == [("report text is empty; fill in its findings / impression or remove the row",
                                         [3])]
    transliterate = ("g2d's text encoders expect English ASCII reports: transliterate it (unicodedata NFKD, "
                     "unidecode; `g2d data import` does this), or re-save the source file as UTF-8 if it is mojibake")
    assert problems["non-ASCII report"] == [
        ("report text holds non-ASCII '\u2013' (U+2013 EN DASH), first in id 'r2' at character 23; " + transliterate,
         [4, 6]),
        ("report text holds non-ASCII '\u00e9' (U+00E9 LATIN SMALL LETTER E WITH ACUTE), first in id 'r3' at "
         "character 4; " + transliterate, [5]),
        ("report text holds non-ASCII '\u00c3' (U+00C3 LATIN CAPITAL LETTER A WITH TILDE), first in id 'r5' at "
         "character 47; g2d's text encoders expect English ASCII reports: it is mojibake (UTF-8 read as "
         "Windows-1252: it should read 'ESSION: Normal \u00e9chographie.'); re-save the source file as UTF-8, "
         "then transliterate (unicodedata NFKD, unidecode)", [7]),
    ]


def test_a_manifest_that_is_not_utf8_names_the_byte(tmp_path: Path) -> None:
    _reports(tmp_path, ["FINDINGS: Clear.", "FINDINGS: Clear."])
    data = (tmp_path / mf.MANIFEST).read_bytes()
    latin1 = data.replace(b"FINDINGS: Clear.\n", "FINDINGS: Caf\u00e9.\n".encode("latin-1"), 2)
    offset = latin1.index(b"\xe9")
    (tmp_path / mf.MANIFEST).write_bytes(latin1)
    with pytest.raises(ManifestError, match=re.escape(f"{tmp_path / mf.MANIFEST}: not UTF-8 at byte {offset} (line 2, "
                                                      "byte 0xE9: invalid continuation byte); re-save it as UTF-8 "
                                                      "(e.g. from Windows-1252: iconv -f cp1252 -t utf-8)")):
        mf.read_manifest(tmp_path)
    with pytest.raises(ManifestError, match="not UTF-8 at byte"):
        mf.validate(tmp_path)


def test_to_ascii_spells_typographic_characters_and_counts_what_it_removes() -> None:
    made = text.to_ascii("No \u201cfocal\u201d consolidation \u2013 heart size normal\u00a0\u2026 caf\u00e9; "
                         "\u00bd cm at 45\u00b0; \u03b1 \ufffd.")
    assert made.text == "No \"focal\" consolidation - heart size normal ... cafe; 1/2 cm at 45 degrees; ."
    assert made.replaced == 8 and made.removed == {"\u03b1": 1, "\ufffd": 1}
    assert text.to_ascii("plain text").text == "plain text"


def test_the_embedded_iu_reports_are_ascii() -> None:
    """SynthCXR pairs its images with these reports: they must pass the non-ASCII check as shipped (they do:
    no normalisation at the source, so the rendered data and its hash are unchanged)."""
    from g2d.data.sources import embedded, iu_reports

    reports = iu_reports.read_reports(embedded.package_data_dir() / embedded.REPORTS.name).reports
    assert len(reports) > 3900
    assert [r.uid for r in reports if not r.text.isascii() or not all(t.isascii() for t in r.mesh)] == []


def test_mimic_import_makes_reports_ascii_and_counts_what_it_removed(tmp_path: Path) -> None:
    from tests.layouts import mimic_cxr as layout

    studies = layout.build(tmp_path / "raw")
    study = next(s for s in studies if s.report == layout.FULL_REPORT)
    path = tmp_path / "raw" / "files" / f"p{study.subject[:2]}" / f"p{study.subject}" / f"s{study.study}.txt"
    raw = path.read_text().replace("There is no focal", "There is \u201cno\u201d\u00a0focal \u2013 \u03b1")
    path.write_bytes(raw.encode("utf-8").replace("\u03b1".encode(), "\u03b1".encode() + b"\xff"))  # + a non-UTF-8 byte
    options = importing.Options(image_size=32, workers=1, shard_size=2, max_failures=0.25)
    result = importing.run("mimic-cxr", tmp_path / "raw", tmp_path / "mimic", None, options)
    df = mf.read_manifest(tmp_path / "mimic").set_index("id")
    reports = df.loc[[im.dicom_id for im in study.images if im.dicom_id in df.index], "report"]
    assert len(reports) and all(r.startswith('FINDINGS: There is "no" focal - consolidation') for r in reports)
    assert df["report"].map(str.isascii).all() and mf.validate(tmp_path / "mimic").ok
    n = len(reports)  # each image of the study carries the report
    assert result.dropped[importing.REMOVED_CHARACTERS] == 2 * n
    record = json.loads((tmp_path / "mimic" / importing.REPORT).read_text())["report_text"]
    # the quotes and the dash (the non-breaking space is whitespace, which sectioning already made a space)
    assert record == {"rows whose report changed": n,
                      "characters spelled in ASCII (quotes, dashes, spaces, accents)": 3 * n,
                      "characters removed": {"'\u03b1' (U+03B1 GREEK SMALL LETTER ALPHA)": n,
                                             "'\ufffd' (U+FFFD REPLACEMENT CHARACTER)": n}}


# ------------------------------------------------------------------ paths and masks

def _with_masks(folder: Path, n: int = 4) -> None:
    rows = []
    for k in range(n):
        (folder / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((SIZE, SIZE), 60, dtype=np.uint8)).save(folder / "images" / f"{k}.png")
        mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
        mask[2:6, 2:6] = 255
        Image.fromarray(mask).save(folder / "images" / f"{k}_mask.png")
        rows.append({"id": f"r{k}", "image": f"images/{k}.png", "patient_id": f"p{k}", "split": "train",
                     "mask": f"images/{k}_mask.png"})
    mf.write_manifest(rows, folder)


def _edit(folder: Path, **cells: list[str]) -> None:
    df = mf.read_manifest(folder)
    for column, values in cells.items():
        df[column] = values
    mf.write_manifest(df, folder)


def test_paths_that_leave_the_dataset_are_listed_and_refused(tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    _with_masks(folder)
    outside = tmp_path / "outside.png"
    Image.fromarray(np.zeros((SIZE, SIZE), dtype=np.uint8)).save(outside)
    _edit(folder, image=["../outside.png", str(outside), "images/2.png", "C:\\data\\x.png"],
          mask=["images/0_mask.png", "images/1_mask.png", "/etc/passwd", "images/3_mask.png"])
    inside = "copy the file into the dataset folder and name it relative to manifest.csv"
    problems = {p.message: p.rows for p in mf.validate(folder).problems}
    assert problems == {f"image path is absolute or contains '..'; {inside}": [2, 3, 5],
                        f"mask path is absolute or contains '..'; {inside}": [4]}
    for rel in ("../outside.png", str(outside)):
        with pytest.raises(ManifestError, match=re.escape(f"{folder / mf.MANIFEST}: path {rel!r} must be relative to "
                                                          "the dataset folder, without '..'")):
            packed.read_resized(folder, rel, SIZE)  # the training reader never opens it
    with pytest.raises(ManifestError, match="must be relative to the dataset folder"):
        mf.dataset_hash(folder)


def test_masks_not_binary_or_not_the_image_size(tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    _with_masks(folder, n=5)
    grey = np.zeros((SIZE, SIZE), dtype=np.uint8)
    grey[2:6, 2:6] = 128
    Image.fromarray(grey).save(folder / "images" / "0_mask.png")
    smooth = np.zeros((SIZE, SIZE), dtype=np.uint8)
    smooth[2:10, 2:10] = 255
    Image.fromarray(smooth).save(folder / "images" / "1_mask.jpg", quality=50)  # JPG ringing: grey levels
    Image.fromarray(np.zeros((SIZE, SIZE, 3), dtype=np.uint8)).save(folder / "images" / "2_mask.png")
    Image.fromarray(np.zeros((SIZE + 1, SIZE), dtype=np.uint8)).save(folder / "images" / "3_mask.png")
    _edit(folder, mask=["images/0_mask.png", "images/1_mask.jpg", "images/2_mask.png", "images/3_mask.png",
                        "images/4_mask.png"])
    problems = {(p.check, p.message): p.rows for p in mf.validate(folder).problems}
    assert problems == {
        ("mask not binary", "mask holds values other than 0 and 1 / 255; threshold it and save it as PNG (JPG's "
                            "compression adds grey levels)"): [2, 3],
        ("mask not binary", "mask must be a single-channel image; save it as a 1-bit or 8-bit grey PNG"): [4],
        ("mask size", "mask is not the size of its image; resize it to the image's size (nearest-neighbour) or check "
                      "that the row names the right mask"): [5],
    }


def test_image_error_survives_pickling_across_workers(tmp_path: Path) -> None:
    import pickle

    path = tmp_path / "zero.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError) as caught:
        images.read_image(path)
    again = pickle.loads(pickle.dumps(caught.value))
    assert str(again) == str(caught.value) and again.check == "undecodable image" and isinstance(again, DataError)
