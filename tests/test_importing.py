"""The shared import engine and split protocols: resume, determinism across worker counts, refusals, the
protocol files' checksums, and the `g2d data import` command with its MLflow run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from g2d.cli import app
from g2d.data import importing, protocols
from g2d.data import manifest as mf
from g2d.errors import ConfigError, DataError
from tests.layouts import siim as layout

OPTIONS = importing.Options(image_size=32, workers=1, shard_size=4)


class Killed(BaseException):
    """Stands for the process dying mid-import (kill, Ctrl-C, power): not an Exception, as those are listed."""


def _killed(*args, **kwargs):
    raise Killed


def test_interrupted_import_resumes_and_matches_an_uninterrupted_one(tmp_path: Path, monkeypatch) -> None:
    layout.build(tmp_path / "raw", n=12, size=64)
    clean = importing.run("siim", tmp_path / "raw", tmp_path / "clean", "siim-patient", OPTIONS)

    real, calls = importing.convert, []

    def dies_at_the_sixth(item, *args, **kwargs):
        calls.append(item.id)
        if len(calls) == 6:
            raise Killed
        return real(item, *args, **kwargs)

    monkeypatch.setattr(importing, "convert", dies_at_the_sixth)
    with pytest.raises(Killed):
        importing.run("siim", tmp_path / "raw", tmp_path / "out", "siim-patient", OPTIONS)
    assert sorted(p.name for p in (tmp_path / "out" / importing.STATE).glob("shard-*")) == ["shard-00000.jsonl"]
    calls.clear()
    monkeypatch.setattr(importing, "convert", lambda item, *a, **k: calls.append(item.id) or real(item, *a, **k))
    resumed = importing.run("siim", tmp_path / "raw", tmp_path / "out", "siim-patient", OPTIONS)
    assert len(calls) == 8 and resumed.resumed_shards == 1  # the first shard of 4 was not redone
    assert (tmp_path / "out" / mf.MANIFEST).read_bytes() == (tmp_path / "clean" / mf.MANIFEST).read_bytes()
    assert resumed.sha256 == clean.sha256
    assert not (tmp_path / "out" / importing.STATE).exists()


def test_worker_processes_give_the_same_dataset(tmp_path: Path) -> None:
    layout.build(tmp_path / "raw", n=40, size=64)
    one = importing.run("siim", tmp_path / "raw", tmp_path / "one", "siim-patient", OPTIONS)
    two = importing.run("siim", tmp_path / "raw", tmp_path / "two", "siim-patient",
                        importing.Options(image_size=32, workers=2, shard_size=4))
    assert one.sha256 == two.sha256


def test_refuses_to_mix_imports(tmp_path: Path, monkeypatch) -> None:
    layout.build(tmp_path / "raw", n=8, size=64)
    importing.run("siim", tmp_path / "raw", tmp_path / "done", "siim-patient", OPTIONS)
    with pytest.raises(DataError, match=r"done already holds a dataset"):
        importing.run("siim", tmp_path / "raw", tmp_path / "done", "siim-patient", OPTIONS)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"busy is not empty"):
        importing.run("siim", tmp_path / "raw", tmp_path / "busy", "siim-patient", OPTIONS)

    monkeypatch.setattr(importing, "convert", _killed)
    with pytest.raises(Killed):
        importing.run("siim", tmp_path / "raw", tmp_path / "half", "siim-patient", OPTIONS)
    with pytest.raises(DataError, match=r"half holds an unfinished import with other settings \(image_size"):
        importing.run("siim", tmp_path / "raw", tmp_path / "half", "siim-patient",
                      importing.Options(image_size=48, workers=1, shard_size=4))
    csv_path = tmp_path / "raw" / "train-rle.csv"  # an annotation edited between the two runs
    csv_path.write_text(csv_path.read_text().replace(",-1\n", ", 5 3\n", 1))
    with pytest.raises(DataError, match=r"half holds an unfinished import with other settings \(items_sha256"):
        importing.run("siim", tmp_path / "raw", tmp_path / "half", "siim-patient", OPTIONS)


def test_source_and_protocol_must_agree(tmp_path: Path) -> None:
    layout.build(tmp_path / "raw", n=3, size=64)
    with pytest.raises(DataError, match=r"protocol rsna-patient.v1 is for rsna, not siim; protocols for siim: "
                                        r"siim-g2d, siim-patient"):
        importing.run("siim", tmp_path / "raw", tmp_path / "x", "rsna-patient", OPTIONS)
    with pytest.raises(DataError, match=r"unknown source 'sim': did you mean 'siim'"):
        importing.run("sim", tmp_path / "raw", tmp_path / "x", None, OPTIONS)
    with pytest.raises(DataError, match=r"--src .*nowhere is not a folder; it must hold train-rle.csv"):
        importing.run("siim", tmp_path / "nowhere", tmp_path / "x", None, OPTIONS)


def test_every_protocol_file_loads_and_matches_its_checksum() -> None:
    names = protocols.available()
    assert {protocols.load(n).source for n in names} == set(importing.SOURCES)
    for name in names:
        p = protocols.load(name)
        assert p.sha256 == protocols._checksums()[f"{p.label}.yaml"]
        if p.paper and p.subset is None:
            assert set(p.paper) == set(p.splits)


def test_an_edited_protocol_file_is_refused(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "protocols"
    shutil.copytree(protocols.FOLDER, folder, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    edited = folder / "siim-g2d.v1.yaml"
    edited.write_text(edited.read_text().replace("n: 1807", "n: 1800", 1))
    monkeypatch.setattr(protocols, "FOLDER", folder)
    monkeypatch.setattr(protocols, "CHECKSUMS", folder / "SHA256SUMS")
    with pytest.raises(ConfigError, match=r"siim-g2d.v1.yaml: SHA-256 .* a protocol never changes in place: write "
                                          r"siim-g2d.v2.yaml"):
        protocols.load("siim-g2d")
    with pytest.raises(ConfigError, match=r"unknown protocol 'siim-g3d': did you mean 'siim-g2d'"):
        protocols.load("siim-g3d")
    with pytest.raises(ConfigError, match=r"protocol siim-g2d has no version 7; versions are \[1\]"):
        protocols.load("siim-g2d.v7")


def test_patient_level_assignment_keeps_patients_whole_and_refuses_a_patient_in_two_partitions() -> None:
    p = protocols.load("chexpert-patient")
    ids = [f"i{k}" for k in range(400)]
    patients = [f"p{k // 4}" for k in range(400)]
    pools = ["train"] * 380 + ["valid"] * 20
    placed = protocols.assign(p, ids, patients, pools, "test")
    by_patient: dict[str, set[str]] = {}
    for i, pat in zip(ids, patients, strict=True):
        by_patient.setdefault(pat, set()).add(placed[i])
    assert all(len(s) == 1 for s in by_patient.values())
    assert [placed[i] for i in ids[380:]] == ["test"] * 20
    pools[379] = "valid"  # patient p94 now spans train.csv and valid.csv
    with pytest.raises(DataError, match=r"patient 'p94' is in two official partitions \('train' and 'valid'\)"):
        protocols.assign(p, ids, patients, pools, "test")


def test_cli_import_records_the_protocol_in_mlflow_and_info_prints_it(project_dir: Path, mlflow_uri: str) -> None:
    from mlflow import MlflowClient

    layout.build(project_dir / "raw", n=6, size=64)
    runner = CliRunner()
    result = runner.invoke(app, ["data", "import", "siim", "--src", "raw", "--out", "data/siim", "--protocol",
                                 "siim-patient", "--set", "importing.image_size=32", "--set", "importing.workers=1"])
    assert result.exit_code == 0, result.output
    assert "protocol siim-patient.v1" in result.output and "failed 0" in result.output
    run = MlflowClient(mlflow_uri).search_runs(
        [MlflowClient(mlflow_uri).get_experiment_by_name("g2d-data").experiment_id])[0]
    sha = protocols.load("siim-patient").sha256
    assert run.data.tags["g2d.protocol"] == "siim-patient.v1" and run.data.tags["g2d.protocol_sha256"] == sha
    assert run.data.tags["g2d.data_hash"] == json.loads((project_dir / "data/siim/dataset.json").read_text())["sha256"]
    assert run.data.metrics["rows"] == 6 and run.info.status == "FINISHED"
    assert (project_dir / "data/siim/contact_sheet.png").is_file()
    logged = {a.path for a in MlflowClient(mlflow_uri).list_artifacts(run.info.run_id, "figures")}
    assert logged == {"figures/contact_sheet.png"}
    info = runner.invoke(app, ["data", "info", "data/siim"])
    assert f"protocol siim-patient.v1 (by patient)  sha256:{sha[:12]}" in info.output
    valid = runner.invoke(app, ["data", "validate", "data/siim"])
    assert valid.exit_code == 0 and "no problems" in valid.output

    bad = runner.invoke(app, ["data", "import", "siim", "--src", "raw", "--out", "data/other", "--protocol", "nope"])
    assert bad.exit_code == 1 and bad.output.count("\n") == 1 and "unknown protocol 'nope'" in bad.output


def test_zero_area_boxes_are_counted_not_fatal(tmp_path: Path) -> None:
    from tests.layouts import radiograph, write_picture

    write_picture(tmp_path / "a.png", radiograph(40, 40))
    item = importing.Item(id="a", image=tmp_path / "a.png", patient_id="a", pool="train", where="t.csv row 2",
                          boxes=[(2, 2, 2, 30, "wire"), (4, 4, 20, 20, "wire")], mask="boxes")
    row = importing.convert(item, 0, tmp_path / "out", 20)
    assert row["boxes"] == [[2.0, 2.0, 10.0, 10.0, "wire"]] and row["dropped_boxes"] == 1
    item.boxes = [(30, 2, 4, 20, "wire")]
    with pytest.raises(importing._ItemError, match=r"t.csv row 2: box \[30.0, 2.0, 4.0, 20.0\] is empty or inverted"):
        importing.convert(item, 0, tmp_path / "out", 20)


def test_one_positive_subset_also_needs_the_other_findings_negative() -> None:
    subset = protocols.Subset(one_of=("a", "b"), per_class=1, others=("c",))
    ids = ["x1", "x2", "x3", "x4"]
    labels = {"a": [1, 1, 0, 1], "b": [0, None, 1, 1], "c": [0, 1, None, 0]}
    # x1: only a, c negative; x2: only a but c positive; x3: only b, c blank; x4: a and b
    assert protocols.select_subset(subset, ids, labels, 0, "t") == ["x1", "x3"]
    with pytest.raises(DataError, match=r"t: the subset takes 2 images with only a positive, but the source has 1"):
        protocols.select_subset(subset.model_copy(update={"per_class": 2}), ids, labels, 0, "t")


def test_boxes_under_a_pixel_and_flat_shapes_draw_without_failing(tmp_path: Path) -> None:
    from tests.layouts import radiograph, write_picture

    write_picture(tmp_path / "big.png", radiograph(400, 400))
    tiny = importing.Item(id="t", image=tmp_path / "big.png", patient_id="t", pool="train", where="t.csv row 3",
                          boxes=[(100, 100, 102, 102, "opacity")], mask="boxes")
    row = importing.convert(tiny, 0, tmp_path / "out", 20)  # 400 -> 20 px: the box is a tenth of a pixel
    mask = np.asarray(Image.open(tmp_path / "out" / row["mask"])) > 127
    assert mask.sum() == 1 and mask[5, 5]
    flat = importing.Item(id="f", image=tmp_path / "big.png", patient_id="f", pool="train", where="t.csv row 4",
                          boxes=[(10, 10, 10, 20, "foreign_object"), (50, 50, 90, 70, "foreign_object")],
                          mask="shapes", shapes=[("rectangle", (10, 10, 10, 20)), ("polygon", (5, 5, 9, 5, 30, 5)),
                                                 ("ellipse", (50, 50, 90, 70))])
    row = importing.convert(flat, 0, tmp_path / "out", 400)
    mask = np.asarray(Image.open(tmp_path / "out" / row["mask"])) > 127
    assert row["dropped_boxes"] == 1 and len(row["boxes"]) == 1
    assert mask[:40].sum() == 0 and mask[50:70, 50:90].mean() == pytest.approx(np.pi / 4, abs=0.08)


def test_a_missing_file_does_not_move_any_other_image_between_splits(tmp_path: Path) -> None:
    """The protocol places every listed image, present or not. (SIIM's patient ids live in the DICOMs, so
    there a missing file changes its patient and the patient-level split; the by-image paper split holds.)"""
    from tests.layouts import rsna as rsna_layout

    rsna_layout.build(tmp_path / "raw", n=24, size=64)
    whole = importing.run("rsna", tmp_path / "raw", tmp_path / "whole", "rsna-patient", OPTIONS)
    sorted((tmp_path / "raw").rglob("*.dcm"))[3].unlink()
    partial = importing.run("rsna", tmp_path / "raw", tmp_path / "partial", "rsna-patient",
                            importing.Options(image_size=32, workers=1, shard_size=4, max_failures=0.1))
    assert whole.rows == 24 and partial.rows == 23 and len(partial.failures) == 1
    before = mf.read_manifest(tmp_path / "whole").set_index("id")["split"]
    after = mf.read_manifest(tmp_path / "partial").set_index("id")["split"]
    assert (before[after.index] == after).all()


def test_by_image_protocols_note_patients_across_splits_instead_of_failing(tmp_path: Path) -> None:
    layout.build(tmp_path / "raw", n=12, size=64)  # two images per patient
    importing.run("siim", tmp_path / "raw", tmp_path / "siim", "siim-patient", OPTIONS)
    df = mf.read_manifest(tmp_path / "siim")
    moved = df.index[df["split"] != "train"][0]  # into train, so the fraction files stay valid
    df.loc[moved, "split"] = "train"
    mf.write_manifest(df, tmp_path / "siim")
    assert mf.validate(tmp_path / "siim").counts() == {"patient in two splits": 2}
    info = mf.read_info(tmp_path / "siim")
    info["protocol"].update(name="siim-g2d", unit="image")
    mf.write_info(tmp_path / "siim", info)
    report = mf.validate(tmp_path / "siim")
    assert report.ok and report.notes == ["1 patients have images in more than one split: protocol siim-g2d.v1 "
                                          "splits by image, as the paper does"]


def test_kill_9_mid_import_then_the_same_command_resumes(tmp_path: Path) -> None:
    """A real SIGKILL of `g2d data import` (no cleanup runs), then the same command: finished shards are kept,
    and the dataset is byte for byte the one an uninterrupted import writes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    layout.build(tmp_path / "raw", n=160, size=256)
    command = [sys.executable, "-m", "g2d.cli", "data", "import", "siim", "--src", str(tmp_path / "raw"),
               "--out", str(tmp_path / "out"), "--protocol", "siim-patient", "--set", "importing.workers=1",
               "--set", "importing.shard_size=8", "--set", "importing.image_size=64"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "out" / importing.STATE
    deadline = time.monotonic() + 120
    while not (state / "shard-00002.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(state.glob("shard-*.jsonl")))
    assert proc.returncode == -signal.SIGKILL and 3 <= done < 20, "the import ended before it could be killed"
    first_shard = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "images" / "00000").iterdir()}
    resumed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert {p: p.stat().st_mtime_ns for p in first_shard} == first_shard  # journalled shards were not redone
    clean = importing.run("siim", tmp_path / "raw", tmp_path / "clean", "siim-patient",
                          importing.Options(image_size=64, workers=1, shard_size=8))
    assert mf.read_info(tmp_path / "out")["sha256"] == clean.sha256
    assert (tmp_path / "out" / mf.MANIFEST).read_bytes() == (tmp_path / "clean" / mf.MANIFEST).read_bytes()


def test_an_image_id_is_never_a_path() -> None:
    assert importing.safe_id("sub dir/../x y.png") == "sub_dir_.._x_y.png" and importing.safe_id("..") == "_"
    item = importing.Item(id="../escape", image=Path("x.png"), patient_id="p", pool="train", where="t.csv row 2")
    with pytest.raises(DataError, match=r"t.csv row 2: image id '../escape' is not a safe file name"):
        importing._place(importing.Scan([item]), protocols.load("siim-patient"), "test")
