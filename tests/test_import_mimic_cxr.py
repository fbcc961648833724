"""MIMIC-CXR-JPG import: the official layout with MIMIC-CXR's reports, report sectioning on realistic report
texts, the errors that name the file and row, and resuming an interrupted import."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from g2d.data import importing
from g2d.data import manifest as mf
from g2d.data.sources import mimic_cxr
from g2d.errors import DataError
from tests.layouts import mimic_cxr as layout

OPTIONS = importing.Options(image_size=32, workers=1, shard_size=2, max_failures=0.25)


def _by_dicom(studies: list[layout.Study]) -> dict[str, tuple[layout.Study, layout.Image]]:
    return {im.dicom_id: (s, im) for s in studies for im in s.images}


def test_import_keeps_frontal_views_with_a_report_and_the_official_split(tmp_path: Path) -> None:
    studies = layout.build(tmp_path / "raw")
    result = importing.run("mimic-cxr", tmp_path / "raw", tmp_path / "mimic", None, OPTIONS)
    out = tmp_path / "mimic"
    assert mf.validate(out).ok
    df = mf.read_manifest(out).set_index("id")
    images = _by_dicom(studies)
    kept = {d for d, (s, im) in images.items()
            if im.view in ("PA", "AP") and im.written and s.report not in (None, layout.NO_SECTIONS)}
    assert set(df.index) == kept and result.rows == 6
    for dicom, row in df.iterrows():
        study, _ = images[dicom]
        assert (row["patient_id"], row["study_id"]) == (study.subject, study.study)
        assert row["split"] == {"train": "train", "validate": "val", "test": "test"}[study.split]  # official split
    assert result.splits == {"train": 3, "val": 2, "test": 1}
    assert json.loads((out / "dataset.json").read_text())["protocol"]["name"] == "mimic-cxr-official"

    reports = {images[d][0].report: r for d, r in df["report"].items()}
    assert reports[layout.FULL_REPORT] == f"FINDINGS: {layout.FULL_FINDINGS} IMPRESSION: {layout.FULL_IMPRESSION}"
    assert reports[layout.IMPRESSION_ONLY] == layout.IMPRESSION_ONLY_TEXT
    assert reports[layout.LAST_PARAGRAPH] == layout.LAST_PARAGRAPH_TEXT
    assert reports[layout.CAPITALS] == layout.CAPITALS_TEXT

    first = df.loc[studies[0].images[0].dicom_id]  # atelectasis -1.0, lung opacity 1.0, effusion 0.0, no finding ""
    assert (first["atelectasis"], first["lung_opacity"], first["effusion"]) == (-1, 1, 0)
    assert pd.isna(first["no_finding"]) and pd.isna(first["edema"])
    no_row = df.loc[studies[2].images[0].dicom_id]  # a study without a row in the CheXpert table: all blank
    assert no_row[list(mimic_cxr.IMPORTER.labels)].isna().all()

    assert result.dropped == {"not a frontal view (ViewPosition LATERAL; PA and AP are kept)": 1,
                              "not a frontal view (ViewPosition LL; PA and AP are kept)": 1,
                              "not a frontal view (ViewPosition blank; PA and AP are kept)": 1,
                              "report has neither a findings nor an impression section": 1}
    failures = {Path(f["file"]).name: f for f in result.failures}
    assert set(failures) == {"s55106413.txt", f"{studies[5].images[1].dicom_id}.jpg"}
    assert failures["s55106413.txt"]["error"].startswith("report of this study")
    meta = tmp_path / "raw" / "mimic-cxr-2.0.0-metadata.csv.gz"
    line = 1 + next(k for k, text in enumerate(gzip.open(meta, "rt").read().splitlines())
                    if text.startswith(studies[4].images[0].dicom_id))
    assert failures["s55106413.txt"]["where"] == f"{meta} row {line}"
    report = json.loads((out / importing.REPORT).read_text())
    assert report["failed"] == 2 and report["attempted"] == 9
    assert report["dropped"] == result.dropped  # the workers' drops (the report without sections) included
    assert report["listed"] == 12  # every row of the metadata table: 7 imported + 3 not frontal + 2 failed


def test_reports_in_their_own_folder_and_the_uncertain_policy(tmp_path: Path) -> None:
    studies = layout.build(tmp_path / "raw", reports=tmp_path / "download" / "mimic-cxr-reports")
    options = importing.Options(image_size=32, workers=1, max_failures=0.25, reports=tmp_path / "download",
                                uncertain={"atelectasis": "ones", "edema": "zeros"})
    importing.run("mimic-cxr", tmp_path / "raw", tmp_path / "mimic", "mimic-cxr-official", options)
    df = mf.read_manifest(tmp_path / "mimic").set_index("id")
    assert df.loc[studies[0].images[0].dicom_id, "atelectasis"] == 1  # -1.0 under U-ones
    assert df.loc[studies[5].images[0].dicom_id, "edema"] == 0  # -1.0 under U-zeros
    assert df.loc[studies[0].images[0].dicom_id, "report"].startswith("FINDINGS: There is no focal")


def test_reports_that_are_nowhere_say_where_they_belong(tmp_path: Path) -> None:
    layout.build(tmp_path / "raw", reports=tmp_path / "elsewhere")
    with pytest.raises(DataError, match=r"not one of 7 studies' reports exists .*s50414267.txt\); unpack MIMIC-CXR "
                                        r"2.0.0's mimic-cxr-reports.zip .* --reports"):
        importing.run("mimic-cxr", tmp_path / "raw", tmp_path / "mimic", None, OPTIONS)


# ---------------------------------------------------------------- sectioning

WRAPPED_IMPRESSION_WITH_TYPO = """                                 FINAL REPORT
 CHEST RADIOGRAPH PERFORMED ON ___
 
 CLINICAL HISTORY:  Fever.
 
 PA AND LATERAL VIEWS OF THE CHEST:  The heart is mildly enlarged.  There is
 a small right pleural effusion.
 
 IMPRESSON:  Cardiomegaly and small right
     effusion.
 
 RECOMMENDATION(S):  Follow-up radiograph.
"""

CONCLUSION_AND_EMPTY_FINDINGS = """ EXAMINATION:  Chest AP portable.
 FINDINGS: 
 
 CONCLUSION:  Lines and tubes in standard position.
"""

LOOSE_TEXT_BEFORE_NOTIFICATION = """                                 FINAL REPORT
 INDICATION:  Cough.
 
 The lungs are clear.
 
 No effusion.
 
 NOTIFICATION:  Discussed with Dr. ___.
"""

HEADERLESS_SINGLE_PARAGRAPH = """                                 FINAL REPORT
 Portable chest radiograph shows clear lungs and normal heart size.
"""

HEADERLESS_TITLE_THEN_TEXT = """                                 FINAL REPORT
 CHEST AP PORTABLE
 
 Endotracheal tube ends 3 cm above the carina.
 
 Lungs are clear.
"""

COMPARISON_LAST = """ INDICATION:  ___-year-old with dyspnea.
 
 TECHNIQUE:  Single AP view.
 
 COMPARISON:  ___.
"""


@pytest.mark.parametrize("text, findings, impression, stand_in", [
    (layout.FULL_REPORT, layout.FULL_FINDINGS, layout.FULL_IMPRESSION, False),  # the wet read above is left out
    (WRAPPED_IMPRESSION_WITH_TYPO, "The heart is mildly enlarged. There is a small right pleural effusion.",
     "Cardiomegaly and small right effusion.", False),
    (CONCLUSION_AND_EMPTY_FINDINGS, "", "Lines and tubes in standard position.", False),
    (layout.CAPITALS, layout.CAPITALS_TEXT.removeprefix("FINDINGS: "), "", False),
    (layout.LAST_PARAGRAPH, "", layout.LAST_PARAGRAPH_TEXT.removeprefix("IMPRESSION: "), True),
    (LOOSE_TEXT_BEFORE_NOTIFICATION, "", "The lungs are clear. No effusion.", True),
    (HEADERLESS_TITLE_THEN_TEXT, "", "Endotracheal tube ends 3 cm above the carina. Lungs are clear.", True),
    (HEADERLESS_SINGLE_PARAGRAPH, "", "", False),  # as the official parser: one paragraph has no last paragraph
    (COMPARISON_LAST, "", "", False),  # the last paragraph is COMPARISON's own, not an impression
    (layout.NO_SECTIONS, "", "", False),
])
def test_sections_of_realistic_reports(text: str, findings: str, impression: str, stand_in: bool) -> None:
    sections = mimic_cxr.section_report(text)
    assert (sections.findings, sections.impression, sections.stand_in) == (findings, impression, stand_in)


def test_section_names_cover_synonyms_typos_and_view_headers() -> None:
    names = {h: mimic_cxr.section_name(h) for h in ("FINDINGS AND IMPRESSION", "IMPRESION", "FINDNGS", "COMPARISONS",
                                                     "REASON FOR EXAM", "PORTABLE AP CHEST", "LUNGS", "WET READ")}
    assert names == {"FINDINGS AND IMPRESSION": "impression", "IMPRESION": "impression", "FINDNGS": "findings",
                     "COMPARISONS": "comparison", "REASON FOR EXAM": "indication", "PORTABLE AP CHEST": "findings",
                     "LUNGS": None, "WET READ": "wet read"}


def test_read_report_gives_none_without_sections_and_reads_crlf(tmp_path: Path) -> None:
    path = tmp_path / "s1.txt"
    path.write_text(layout.NO_SECTIONS)
    assert mimic_cxr.read_report(path) is None
    path.write_bytes(layout.IMPRESSION_ONLY.replace("\n", "\r\n").encode())
    assert mimic_cxr.read_report(path) == layout.IMPRESSION_ONLY_TEXT
    with pytest.raises(DataError, match="cannot be read"):
        mimic_cxr.read_report(tmp_path)  # a folder


# ---------------------------------------------------------------- errors naming the file and row


def _rewrite_gz(path: Path, edit) -> None:
    lines = gzip.open(path, "rt").read().splitlines()
    with gzip.open(path, "wt") as f:
        f.write("\n".join(edit(lines)) + "\n")


def test_missing_metadata_column_lists_expected_and_found(tmp_path: Path) -> None:
    layout.build(tmp_path / "raw")
    _rewrite_gz(tmp_path / "raw" / "mimic-cxr-2.0.0-metadata.csv.gz",
                lambda lines: [lines[0].replace("ViewPosition", "View Position")] + lines[1:])
    with pytest.raises(DataError, match=r"metadata.csv.gz: missing column\(s\) \['ViewPosition'\]; expected "
                                        r"\['dicom_id', 'subject_id', 'study_id', 'ViewPosition'\], found "
                                        r"\['dicom_id', 'subject_id', 'study_id', "
                                        r"'PerformedProcedureStepDescription', 'View Position'"):
        importing.run("mimic-cxr", tmp_path / "raw", tmp_path / "mimic", None, OPTIONS)


def test_bad_label_value_names_file_row_and_column(tmp_path: Path) -> None:
    layout.build(tmp_path / "raw")
    _rewrite_gz(tmp_path / "raw" / "mimic-cxr-2.0.0-chexpert.csv.gz",
                lambda lines: lines[:2] + [lines[2].rsplit(",", 1)[0] + ",yes"] + lines[3:])
    with pytest.raises(DataError, match=r"chexpert.csv.gz row 3: column 'Support Devices' holds 'yes'; the labeller "
                                        r"writes 1.0, 0.0, -1.0 or blank"):
        importing.run("mimic-cxr", tmp_path / "raw", tmp_path / "mimic", None, OPTIONS)


def test_bad_split_and_missing_table_are_named(tmp_path: Path) -> None:
    layout.build(tmp_path / "raw")
    split = tmp_path / "raw" / "mimic-cxr-2.0.0-split.csv"
    split.write_text(split.read_text().replace(",validate", ",valid"))
    with pytest.raises(DataError, match=r"split.csv row 7: split is 'valid'; MIMIC-CXR-JPG's split file holds train, "
                                        r"validate, test \(3 rows differ\)"):
        importing.run("mimic-cxr", tmp_path / "raw", tmp_path / "a", None, OPTIONS)
    split.unlink()
    with pytest.raises(DataError, match=r"missing mimic-cxr-2.0.0-split.csv.gz \(or unpacked, "
                                        r"mimic-cxr-2.0.0-split.csv\)"):
        importing.run("mimic-cxr", tmp_path / "raw", tmp_path / "b", None, OPTIONS)


def test_non_numeric_subject_id_names_the_row(tmp_path: Path) -> None:
    layout.build(tmp_path / "raw")
    _rewrite_gz(tmp_path / "raw" / "mimic-cxr-2.0.0-metadata.csv.gz",
                lambda lines: lines[:3] + [lines[3].replace(",10000032,", ",../x,")] + lines[4:])
    with pytest.raises(DataError, match=r"metadata.csv.gz row 4: subject_id is '../x'; MIMIC-CXR's subject_id is a "
                                        r"number"):
        importing.run("mimic-cxr", tmp_path / "raw", tmp_path / "mimic", None, OPTIONS)


# ---------------------------------------------------------------- resuming


def test_rerun_after_the_failure_threshold_reuses_every_converted_shard(tmp_path: Path) -> None:
    layout.build(tmp_path / "raw")
    out = tmp_path / "mimic"
    strict = importing.Options(image_size=32, workers=1, shard_size=2, max_failures=0.0)
    with pytest.raises(DataError, match=r"2 of 9 images failed to import"):
        importing.run("mimic-cxr", tmp_path / "raw", out, None, strict)
    assert not (out / mf.MANIFEST).exists() and (out / importing.STATE).is_dir()
    converted = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    result = importing.run("mimic-cxr", tmp_path / "raw", out, None, OPTIONS)  # accepting the two failures
    assert result.resumed_shards == 4 and result.rows == 6  # 7 items in shards of 2, none converted again
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == converted
    assert mf.validate(out).ok and not (out / importing.STATE).exists()


def test_an_interrupted_import_resumes_where_it_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout.build(tmp_path / "raw")
    calls = []
    convert = importing.convert

    def killed_at_the_fourth_image(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # what a kill looks like to Python; an Exception would be a listed failure
        return convert(*args, **kwargs)

    monkeypatch.setattr(importing, "convert", killed_at_the_fourth_image)
    with pytest.raises(KeyboardInterrupt):
        importing.run("mimic-cxr", tmp_path / "raw", tmp_path / "mimic", None, OPTIONS)
    assert sorted(p.name for p in (tmp_path / "mimic" / importing.STATE).glob("shard-*")) == ["shard-00000.jsonl"]
    monkeypatch.setattr(importing, "convert", convert)
    result = importing.run("mimic-cxr", tmp_path / "raw", tmp_path / "mimic", None, OPTIONS)
    assert result.resumed_shards == 1
    importing.run("mimic-cxr", tmp_path / "raw", tmp_path / "fresh", None, OPTIONS)
    assert (tmp_path / "mimic" / mf.MANIFEST).read_bytes() == (tmp_path / "fresh" / mf.MANIFEST).read_bytes()
