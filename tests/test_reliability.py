"""Issue 8: preflight checks, bad inputs that leave no run or model behind, data integrity against DVC and
dataset.json, SIGTERM / full-disk / non-finite faults during pre-training."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from g2d.cli import app
from g2d.data import integrity
from g2d.data import manifest as mf
from g2d.errors import DataError
from g2d.pipeline import runtime
from tests.conftest import _TRACKING_ENV, tiny_synthcxr_project

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = Path("datasets/synthcxr/pretrain")  # params.tiny.yaml's paths.synthcxr + /pretrain
PNEUMOTHORAX = Path("datasets/synthcxr/pneumothorax")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reliability") / "project"
    tiny_synthcxr_project(root)
    return root


@pytest.fixture
def project(rendered, mlflow_template_db, tmp_path, monkeypatch) -> Path:
    """A private copy of the rendered tiny project as the cwd, with its own store."""
    root = tmp_path / "project"
    shutil.copytree(rendered, root)
    shutil.copyfile(mlflow_template_db, root / "mlflow.db")
    for var in _TRACKING_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.chdir(root)
    return root


def _store(root: Path) -> tuple[list[str], list[str]]:
    """(status of every run, name of every registered model) in the project's store."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    statuses = [r.info.status for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    return statuses, [m.name for m in client.search_registered_models()]


def _one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    progress = re.compile(r"\s\d+/\d+\s+\d+:\d\d:\d\d")  # a progress bar's row (stderr, redrawn in a terminal)
    lines = [ln for ln in result.output.splitlines() if ln.strip() and not progress.search(ln)]
    assert len(lines) == 1 and lines[0].startswith("g2d: error: "), result.output
    return lines[0]


def _first_image(root: Path, folder: Path = PRETRAIN) -> Path:
    return root / folder / mf.read_manifest(root / folder)["image"].iloc[0]


# ---------------------------------------------------------------- data integrity


def _dvc_track(root: Path, out: str, stage: str = "synth") -> None:
    """What `dvc repro` leaves for a stage output: its dvc.lock entry and the .dir listing in the cache."""
    folder = root / out
    entries = sorted(({"md5": hashlib.md5(p.read_bytes()).hexdigest(), "relpath": p.relative_to(folder).as_posix()}
                      for p in folder.rglob("*") if p.is_file()), key=lambda e: e["relpath"])
    listing = json.dumps(entries).encode()
    digest = hashlib.md5(listing).hexdigest()
    cache = root / ".dvc" / "cache" / "files" / "md5" / digest[:2]
    cache.mkdir(parents=True, exist_ok=True)
    (cache / f"{digest[2:]}.dir").write_bytes(listing)
    lock = {"schema": "2.0", "stages": {stage: {"cmd": "g2d data synth", "outs": [
        {"path": out, "hash": "md5", "md5": f"{digest}.dir", "nfiles": len(entries)}]}}}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))


def test_data_matching_dvc_lock_passes_and_names_its_record(project):
    _dvc_track(project, "datasets/synthcxr")
    verified = integrity.verify(project / PRETRAIN, project, hash_all_below=10**12, sample=8)
    assert "matches dvc.lock (stage synth) for datasets/synthcxr" in verified.how
    n = sum(1 for p in (project / PRETRAIN).rglob("*") if p.is_file())
    assert f"({n} of {n} files hashed)" in verified.how


@pytest.mark.parametrize("hash_all", [True, False])
def test_changed_missing_and_extra_files_are_refused_with_the_dvc_fix(project, hash_all):
    _dvc_track(project, "datasets/synthcxr")
    image = _first_image(project)
    image.write_bytes(image.read_bytes()[:-10] + b"0123456789")  # same size, other bytes
    (project / PRETRAIN / mf.DATASET_INFO).unlink()
    (project / PRETRAIN / "stray.png").write_bytes(b"x")
    # a sample of 0 still hashes the manifest, dataset.json and fraction files, so plant the change in one of them
    if not hash_all:
        (project / PRETRAIN / "fractions" / "train_0.1.txt").write_text("edited\n")
    with pytest.raises(DataError) as e:
        integrity.verify(project / PRETRAIN, project, hash_all_below=10**12 if hash_all else 0, sample=0)
    msg = str(e.value)
    assert "differs from what dvc.lock (stage synth) records for datasets/synthcxr" in msg
    assert "1 missing, e.g. dataset.json" in msg and "1 not recorded, e.g. stray.png" in msg
    changed = image.relative_to(project / PRETRAIN).as_posix() if hash_all else "fractions/train_0.1.txt"
    assert f"changed, e.g. {changed}" in msg
    assert "bring it back with `dvc checkout datasets/synthcxr` (or `dvc repro synth`)" in msg


def test_data_dvc_file_record_suggests_checkout_or_add(project):
    data = project / "data" / "mine"
    shutil.copytree(project / PRETRAIN, data)
    _dvc_track(project, "data")
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["synth"]["outs"]
    (project / "dvc.lock").unlink()
    (project / "data.dvc").write_text(yaml.safe_dump({"outs": lock}))
    _first_image(project, Path("data/mine")).write_bytes(b"changed")
    with pytest.raises(DataError, match=r"differs from what data.dvc records for data \(1 changed.*bring it back with "
                                        r"`dvc checkout data.dvc` \(or `dvc add data` if you changed it on purpose\)"):
        integrity.verify(data, project, hash_all_below=10**12, sample=8)


def test_a_dataset_imported_into_data_before_dvc_add_is_checked_by_its_own_hashes(project):
    shutil.copytree(project / PRETRAIN, project / "data" / "old")
    _dvc_track(project, "data")  # data.dvc recorded data/old; data/new arrives afterwards
    shutil.copytree(project / PRETRAIN, project / "data" / "new")
    verified = integrity.verify(project / "data" / "new", project, hash_all_below=10**12, sample=8)
    assert verified.how.startswith("new in data, not yet recorded by dvc.lock (stage synth) (`dvc add data`); "
                                   "matches dataset.json sha256")


def test_without_dvc_each_file_is_checked_against_checksums_sha256(project):
    folder = project / PRETRAIN
    assert subprocess.run(["sha256sum", "--quiet", "-c", mf.CHECKSUMS], cwd=folder).returncode == 0
    n = len(mf.read_checksums(folder))
    assert integrity.verify(folder, project, hash_all_below=10**12, sample=8).how.startswith(
        f"matches dataset.json sha256 {mf.read_info(folder)['sha256'][:12]} through checksums.sha256 ({n} of {n} ")
    image = _first_image(project)
    rel = image.relative_to(folder).as_posix()
    image.write_bytes(b"changed")
    with pytest.raises(DataError, match=rf"pretrain: differs from its checksums.sha256 \(1 changed, e.g. {rel}\); "
                                        r"bring them back with `dvc checkout` if DVC tracks them, or re-render"):
        integrity.verify(folder, project, hash_all_below=10**12, sample=8)
    # a large dataset: the manifest, dataset.json, the fractions and a sample are hashed
    assert "(8 of" not in integrity.verify(folder, project, hash_all_below=0, sample=0).how  # not sampled: passes
    image.unlink()
    with pytest.raises(DataError, match=rf"\(1 missing, e.g. {rel}\)"):
        integrity.verify(folder, project, hash_all_below=0, sample=0)


def test_checksums_must_add_up_to_dataset_json(project):
    folder = project / PRETRAIN
    image = _first_image(project)
    rel = image.relative_to(folder).as_posix()
    image.write_bytes(b"changed")  # and the checksum edited to match: dataset.json's sha256 still catches it
    sums = (folder / mf.CHECKSUMS).read_text().replace(mf.read_checksums(folder)[rel], hashlib.sha256(b"changed")
                                                       .hexdigest())
    (folder / mf.CHECKSUMS).write_text(sums)
    with pytest.raises(DataError, match=r"pretrain: checksums.sha256 does not add up to the sha256 \w{12} in "
                                        r"dataset.json; bring them back"):
        integrity.verify(folder, project, hash_all_below=10**12, sample=8)
    (folder / mf.MANIFEST).write_text((folder / mf.MANIFEST).read_text() + "\n")
    with pytest.raises(DataError, match=r"pretrain: manifest.csv changed since checksums.sha256 was written"):
        integrity.verify(folder, project, hash_all_below=10**12, sample=8)


def test_without_checksums_the_dataset_json_hash_is_recomputed(project):
    (project / PRETRAIN / mf.CHECKSUMS).unlink()  # a dataset written before checksums were recorded
    verified = integrity.verify(project / PRETRAIN, project, hash_all_below=10**12, sample=8)
    assert verified.how.startswith("matches dataset.json sha256")
    _first_image(project).write_bytes(b"changed")
    with pytest.raises(DataError, match=r"pretrain: the files no longer match the sha256 \w{12} that dataset.json "
                                        r"records \(now \w{12}\); bring them back with `dvc checkout`"):
        integrity.verify(project / PRETRAIN, project, hash_all_below=10**12, sample=8)
    # over the full-hash limit, outside DVC and without checksums: said, not silently passed
    assert "only the sampled validation checks them" in integrity.verify(project / PRETRAIN, project, hash_all_below=0,
                                                                      sample=8).how


def test_a_dvc_record_whose_listing_is_not_in_the_cache_falls_back_to_dataset_json(project):
    _dvc_track(project, "datasets/synthcxr")
    shutil.rmtree(project / ".dvc" / "cache")
    assert integrity.verify(project / PRETRAIN, project, hash_all_below=10**12, sample=8).how.startswith(
        "matches dataset.json")


# ---------------------------------------------------------------- g2d pretrain: bad inputs leave nothing behind


def _corrupt(project: Path) -> str:
    path = _first_image(project)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    return path.name


def _truncate(project: Path) -> str:
    path = _first_image(project)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path.name


def _empty(project: Path) -> str:
    path = _first_image(project)
    path.write_bytes(b"")
    return path.name


def _edit_report(project: Path, row: int, text: str) -> str:
    df = mf.read_manifest(project / PRETRAIN)
    df.loc[row, "report"] = text
    df.to_csv(project / PRETRAIN / mf.MANIFEST, index=False)
    return ""


def _non_ascii_report(project: Path) -> str:
    return _edit_report(project, 1, "Small left pleural effusion, unchanged since 2019 (caf\u00e9 au lait).")


def _empty_report(project: Path) -> str:
    return _edit_report(project, 2, "   ")


def _mask_not_binary(project: Path) -> str:
    df = mf.read_manifest(project / PRETRAIN)
    rel = next(f["mask"] for cell in df["findings"] for f in json.loads(cell or "[]") if f.get("mask"))
    from PIL import Image

    Image.fromarray((np.arange(64 * 64).reshape(64, 64) % 200).astype("uint8")).save(project / PRETRAIN / rel)
    return ""


NO_HASH = ["--set", "preflight.verify_data=false", "--set", "preflight.decode_sample=10000"]


@pytest.mark.parametrize("damage, args, message", [
    (_corrupt, [], r"pretrain: differs from its checksums.sha256 \(1 changed, e.g. .*{name}\); .*`dvc checkout`"),
    (_corrupt, NO_HASH, r"manifest.csv row 2 \(id .*, image .*{name}\): undecodable image: .*corrupt or not an "
                        r"image.*`g2d data validate .*` lists every row"),
    (_truncate, NO_HASH, r"manifest.csv row 2 \(id .*, image .*{name}\): .*(truncated|cut short)"),
    (_empty, NO_HASH, r"manifest.csv row 2 \(id .*, image .*{name}\): .*empty \(0 bytes\)"),
    (_non_ascii_report, NO_HASH, r"manifest.csv row 3 \(id .*\): non-ASCII report: .*'é' \(U\+00E9"),
    (_empty_report, NO_HASH, r"manifest.csv row 4 \(id .*\): empty report: "),
    (_mask_not_binary, NO_HASH, r"manifest.csv row \d+ \(id .*\): mask not binary: "),
    (None, ["--set", "preflight.min_free_gb=1e9"], r"GB free on its disk, preflight.min_free_gb needs 1e\+09"),
    (None, ["--set", "pretrain.batch_sise=4"], r"unknown key 'pretrain.batch_sise': did you mean 'batch_size'"),
    (None, ["--resume"], r"checkpoint.pt: not a readable g2d checkpoint"),
])  # fmt: skip
def test_bad_inputs_to_pretrain_fail_in_one_line_before_a_run(project, damage, args, message):
    name = damage(project) if damage else ""
    if "--resume" in args:
        ckpt = project / "models" / "pretrain-checkpoints" / "checkpoint.pt"
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"PK\x03\x04 half a zip")
    result = CliRunner().invoke(app, ["pretrain", *args])
    assert re.search(message.format(name=re.escape(name)), _one_line_error(result)), result.output
    assert _store(project) == ([], [])  # no run opened, nothing registered


def test_a_typo_in_params_yaml_is_one_line(project):
    text = (project / "params.yaml").read_text().replace("  batch_size: 8", "  batch_sise: 8", 1)
    (project / "params.yaml").write_text(text)
    line = _one_line_error(CliRunner().invoke(app, ["pretrain"]))
    assert "params.yaml: unknown key 'pretrain.batch_sise': did you mean 'batch_size'" in line
    assert _store(project) == ([], [])


def test_a_tracking_server_that_is_down_is_named_within_seconds(project, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    line = _one_line_error(CliRunner().invoke(app, ["pretrain"]))
    assert f"cannot reach the MLflow tracking server at {uri}" in line and "mlflow server --host 127.0.0.1" in line
    assert time.monotonic() - started < 30  # MLflow's own retries would take minutes


def test_train_refuses_changed_data_before_a_run(project):
    image = _first_image(project, PNEUMOTHORAX)
    image.write_bytes(b"changed")
    line = _one_line_error(CliRunner().invoke(app, ["train", "--task", "siim-seg", "--init", "random"]))
    assert "pneumothorax: differs from its checksums.sha256 (1 changed" in line
    assert _store(project) == ([], [])


def test_g2d_preflight_says_what_it_checked_and_fails_like_the_stages(project):
    result = CliRunner().invoke(app, ["preflight", "--task", "siim-seg"])
    assert result.exit_code == 0, result.output
    assert "config: valid" in result.output and "disk:" in result.output
    assert "pretrain: matches dataset.json sha256" in result.output
    assert "pneumothorax: matches dataset.json sha256" in result.output and "preflight ok in" in result.output
    image = _first_image(project, PNEUMOTHORAX)
    image.write_bytes(b"")
    line = _one_line_error(CliRunner().invoke(app, ["preflight", "--task", "siim-seg"]))
    rel = image.relative_to(project / PNEUMOTHORAX).as_posix()
    assert f"pneumothorax: differs from its checksums.sha256 (1 changed, e.g. {rel})" in line
    assert _store(project) == ([], [])


def test_preflight_is_logged_with_the_run(project):
    result = CliRunner().invoke(app, ["pretrain", "--set", "pretrain.max_steps=1"])
    assert result.exit_code == 0, result.output
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("g2d-pretrain").experiment_id])
    assert set(run.data.metrics) >= {"loss/total", "loss/global", "loss/dense"} and "loss/stop" not in run.data.metrics
    text = Path(client.download_artifacts(run.info.run_id, "preflight.txt", str(project))).read_text()
    assert "tracking: sqlite:///" in text and "GB free at" in text
    assert "pretrain: matches dataset.json sha256" in text and "through checksums.sha256" in text
    assert "rows valid (text of every row, files of 32 sampled rows)" in text


# ---------------------------------------------------------------- faults during pre-training


def test_a_non_finite_loss_stops_with_the_step_ids_and_a_debug_checkpoint(project, monkeypatch):
    from g2d.pipeline.pretrain import step as pretrain_step

    real, calls = pretrain_step.Trainer.losses, {"n": 0}

    def nan_at_step_2(self, batch, *args, **kwargs):
        losses = real(self, batch, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            calls["ids"] = list(batch["id"])
            losses.total = losses.total * float("nan")
        return losses

    monkeypatch.setattr(pretrain_step.Trainer, "losses", nan_at_step_2)
    line = _one_line_error(CliRunner().invoke(app, ["pretrain", "--set", "pretrain.max_steps=3"]))
    debug = project / "models" / "pretrain-checkpoints" / "nonfinite-step000002.pt"
    assert f"pre-training loss is nan at step 2; the batch's images: {', '.join(calls['ids'])}; debug " in line
    assert str(debug) in line and "lower pretrain.lr or check these images" in line
    saved = torch.load(debug, weights_only=True)
    assert saved["step"] == 2 and saved["ids"] == calls["ids"] and "model" in saved and "optimizer" in saved
    assert saved["batch"]["image"].shape[0] == len(calls["ids"])
    assert _store(project) == (["FAILED"], [])


@pytest.mark.parametrize(("task", "targets"), [("siim-seg", "masks"), ("rsna-det", "boxes")])
def test_a_non_finite_fine_tuning_loss_names_the_images_and_writes_a_debug_checkpoint(project, monkeypatch, task,
                                                                                        targets):
    from g2d.pipeline import distributed

    real, calls = distributed.mean, {"n": 0}

    def nan_at_step_2(ctx, values):
        if "loss" in values:
            calls["n"] += 1
            if calls["n"] == 2:
                return {"loss": float("inf")}
        return real(ctx, values)

    monkeypatch.setattr(distributed, "mean", nan_at_step_2)
    line = _one_line_error(CliRunner().invoke(app, ["train", "--task", task, "--init", "random", "--frac", "1"]))
    [debug] = (project / "models" / "debug").glob(f"{task}_*.pt")
    assert debug.name == f"{task}_1.0_random_seed42-nonfinite-step000002.pt"
    saved = torch.load(debug, weights_only=True)
    assert f"fine-tuning loss is not finite at step 2; the batch's images: {', '.join(saved['ids'])}; debug " in line
    assert str(debug) in line and saved["step"] == 2 and "model" in saved
    assert saved["batch"]["images"].shape[0] == len(saved["ids"]) == len(saved["batch"][targets]) > 0
    assert _store(project) == (["FAILED"], [])


def test_a_full_disk_never_leaves_a_truncated_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    runtime.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    before = path.read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(runtime.CheckpointError, match=r"checkpoint.pt: cannot write the checkpoint \(No space left on "
                                                      r"device\); the previous one is untouched. Free disk space"):
        runtime.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert runtime.load_checkpoint(path)["step"] == 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_first_stop_signal_is_a_request_the_second_stops_at_once(signum):
    from g2d.tracking import Terminated

    received: list[int] = []

    def previous(s, frame):
        received.append(s)

    before = signal.signal(signum, previous)
    try:
        with runtime.StopRequests() as stop:
            os.kill(os.getpid(), signum)
            assert stop.signum == signum and not received  # noted: the loop finishes its step and checkpoints
            with pytest.raises(Terminated if signum == signal.SIGTERM else KeyboardInterrupt):
                os.kill(os.getpid(), signum)
        # the loop never acted on the request (e.g. it came after the last step): the previous handler gets it
        assert received == [signum]
        with runtime.StopRequests() as stop:
            os.kill(os.getpid(), signum)
            stop.handled = True  # the loop checkpointed and stopped on it
        assert received == [signum] and signal.getsignal(signum) is previous
    finally:
        signal.signal(signum, before)


def _env(project: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _TRACKING_ENV}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return env


def _logged_steps(project: Path) -> int:
    try:
        with sqlite3.connect(f"file:{project / 'mlflow.db'}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT COUNT(*) FROM metrics WHERE key = 'loss/total'").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_ends_the_run_killed_and_resumes(project):
    """SIGTERM to the whole process group (what a scheduler sends), with a dataloader worker: the main process
    finishes its step, writes a checkpoint, closes the run KILLED and exits 143; --resume finishes the job."""
    total = 40
    overrides = ("pretrain.epochs=100", f"pretrain.max_steps={total}", "pretrain.checkpoint_every=1000",
                 "pretrain.grid_every=1000", "pretrain.num_workers=1")
    args = [sys.executable, "-m", "g2d.cli", "pretrain", *(a for o in overrides for a in ("--set", o))]
    log = (project / "stopped.log").open("w")
    proc = subprocess.Popen(args, cwd=project, env=_env(project), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while _logged_steps(project) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    output = (project / "stopped.log").read_text()
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    ckpt = project / "models" / "pretrain-checkpoints" / "checkpoint.pt"
    step = int(torch.load(ckpt, weights_only=True)["step"])
    assert 3 <= step < total
    assert (f"g2d: stopped by SIGTERM after step {step} of {total}; checkpoint {ckpt}; continue with `g2d pretrain "
            "--resume`") in output
    assert "Traceback" not in output and "exited unexpectedly" not in output
    assert _store(project) == (["KILLED"], [])

    resumed = subprocess.run([*args, "--resume"], cwd=project, env=_env(project), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(_store(project)[0]) == ["FINISHED", "KILLED"] and _store(project)[1] == ["g2d-encoder"]
    assert int(torch.load(ckpt, weights_only=True)["step"]) == total
