"""Readers of the embedded sources, on tiny hand-made inputs, and `g2d data fetch`."""

import gzip
import io
import tarfile
import zipfile

import numpy as np
import pytest
from typer.testing import CliRunner

from g2d.cli import app
from g2d.data.sources import embedded, iu_reports, rsna, siim
from g2d.errors import DataError


def test_siim_rle_is_relative_column_major_and_rows_merge(tmp_path):
    # 4 x 3 image, column-major: pixel (row r, col c) is flat index c * 4 + r
    mask = siim.decode_rle("1 2 3 1", height=4, width=3)
    expected = np.zeros((4, 3), dtype=bool)
    expected[1, 0] = expected[2, 0] = True  # flat 1, 2
    expected[2, 1] = True  # flat 3 + 3 = 6 -> col 1, row 2
    assert (mask == expected).all()
    assert not siim.decode_rle(" -1", 4, 3).any()
    path = tmp_path / "train-rle.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write("ImageId, EncodedPixels\na, 0 2\na, 1024 2\nb,-1\n")
    table = siim.read_rle_table(path)
    assert table == {"a": ["0 2", "1024 2"], "b": ["-1"]}
    merged = siim.image_mask(table["a"])
    assert merged.sum() == 4 and merged[0, 0] and merged[1, 0] and merged[0, 1] and merged[1, 1]


def test_siim_bad_rle_names_the_row():
    with pytest.raises(DataError, match=r"img row 1: EncodedPixels has an odd number of values"):
        siim.image_mask(["1 2 3"], where="img")
    with pytest.raises(DataError, match=r"leaves the 4x3 image"):
        siim.decode_rle("10 5", height=4, width=3)


def test_rsna_boxes_merge_per_patient(tmp_path):
    path = tmp_path / "labels.csv.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("stage_2_train_labels.csv",
                   "patientId,x,y,width,height,Target\na,,,,,0\nb,10,20,30,40,1\nb,100,100,10,10,1\n")
    patients = rsna.read_labels(path)
    assert [(p.patient_id, p.positive) for p in patients] == [("a", False), ("b", True)]
    assert patients[1].boxes == ((10, 20, 40, 60), (100, 100, 110, 110))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.csv", "patientId,x,y,width,height,Target\nb,,,,,1\n")
    with pytest.raises(DataError, match=r"row 2: Target 1 without a numeric x, y, width, height"):
        rsna.read_labels(path)


def _report_xml(uid: str, findings: str, impression: str, mesh: list[str]) -> bytes:
    majors = "".join(f"<major>{m}</major>" for m in mesh)
    return (f'<eCitation><uId id="{uid}"/><MedlineCitation><Article><Abstract>'
            f'<AbstractText Label="FINDINGS">{findings}</AbstractText>'
            f'<AbstractText Label="IMPRESSION">{impression}</AbstractText>'
            f"</Abstract></Article></MedlineCitation><MeSH>{majors}</MeSH></eCitation>").encode()


def test_iu_reports_keep_text_and_mesh_and_count_drops(tmp_path):
    path = tmp_path / "reports.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in [("ecgen-radiology/2.xml", _report_xml("CXR2", "Small   left effusion.", "",
                                                                      ["Pleural Effusion/left/small"])),
                           ("ecgen-radiology/10.xml", _report_xml("CXR10", "", "", ["normal"])),
                           ("ecgen-radiology/1.xml", _report_xml("CXR1", "Clear.", "Normal.", ["normal"]))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    result = iu_reports.read_reports(path)
    assert [r.uid for r in result.reports] == ["CXR1", "CXR2"]
    assert result.reports[1].findings == "Small left effusion."
    assert result.reports[1].mesh == ("Pleural Effusion/left/small",)
    assert result.reports[0].text == "FINDINGS: Clear. IMPRESSION: Normal."
    assert result.dropped == {"no findings or impression text": 1}


def test_real_report_archive_is_parsed():
    result = iu_reports.read_reports(embedded.package_data_dir() / embedded.REPORTS.name)
    assert 3800 < len(result.reports) < 3955
    assert sum(result.dropped.values()) == 3955 - len(result.reports)


def test_fetch_copies_byte_for_byte_and_is_idempotent(tmp_path):
    dest = tmp_path / "data"
    first = embedded.fetch(dest)
    assert [copied for _, _, copied in first] == [True] * 4
    for source, path, _ in first:
        assert embedded.sha256_file(path) == source.sha256
        assert path.read_bytes() == (embedded.package_data_dir() / source.name).read_bytes()
    assert [copied for _, _, copied in embedded.fetch(dest)] == [False] * 4
    (dest / embedded.REPORTS.name).write_bytes(b"tampered")
    with pytest.raises(DataError, match=r"NLMCXR_reports.tgz: SHA-256 .* differs .* run `g2d data fetch`"):
        embedded.source_path(dest, embedded.REPORTS)
    assert [copied for _, _, copied in embedded.fetch(dest)] == [True, False, False, False]


def test_cli_fetch_into_params_sources(project_dir):
    (project_dir / "params.yaml").write_text("paths:\n  sources: raw\n")
    result = CliRunner().invoke(app, ["data", "fetch"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (project_dir / "raw").iterdir()) == sorted(s.name for s in embedded.SOURCES)


def test_missing_source_is_one_clear_line(project_dir):
    (project_dir / "params.yaml").write_text("")
    result = CliRunner().invoke(app, ["data", "synth"])
    assert result.exit_code == 1
    assert "g2d: error:" in result.output and "missing source file" in result.output
    assert "run `g2d data fetch`" in result.output


def test_fetch_runs_on_defaults_without_a_params_file(project_dir):
    result = CliRunner().invoke(app, ["data", "fetch"])
    assert result.exit_code == 0, result.output
    assert (project_dir / "data" / embedded.REPORTS.name).is_file()
