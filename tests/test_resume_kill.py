"""Exact resume of `g2d pretrain` after a real `kill -9`: the resumed run ends with the weights, metrics and model
folder of an uninterrupted run, bit for bit (CPU).

Every run is a separate `python -m g2d.cli` process with the same environment, so the comparison cannot depend
on what earlier tests did to this interpreter (threads, RNG, backend flags). Each process uses one CPU thread,
and the uninterrupted reference runs in its own copy of the project at the same time as the killed and resumed
runs: on two cores that takes about as long as the killed and resumed runs alone.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from g2d.config import load_params
from g2d.pipeline.pretrain import stage as pretrain
from tests.conftest import _TRACKING_ENV, tiny_synthcxr_project

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals"),
]

# params.tiny.yaml has 3 steps an epoch (30 training pairs in batches of 8): 18 steps are 6 epochs, and the first
# checkpoint (step 4) is mid-epoch. After it, 14 steps and the final evaluation are left for the kill to land in.
TOTAL = 18
CHECKPOINT_EVERY = 4
OVERRIDES = ("pretrain.epochs=100", f"pretrain.max_steps={TOTAL}", f"pretrain.checkpoint_every={CHECKPOINT_EVERY}",
             "pretrain.grid_every=1000")  # attention grids cost time and never touch the weights or an RNG
TIMEOUT_S = 300  # per process; the whole test takes about a minute on 2 cores


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    """params.tiny.yaml with its SynthCXR rendered (no store, no models): copied by each test."""
    root = tmp_path_factory.mktemp("resume-kill") / "project"
    tiny_synthcxr_project(root)
    return root


def _project(rendered: Path, mlflow_template_db: Path, dest: Path) -> Path:
    shutil.copytree(rendered, dest)
    shutil.copyfile(mlflow_template_db, dest / "mlflow.db")
    return dest


def _env(project: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _TRACKING_ENV}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{(project / 'mlflow.db').as_posix()}"
    # the checkout under test, whether or not (and wherever) the package is installed
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["CUDA_VISIBLE_DEVICES"] = ""  # the claim is bitwise on CPU; CUDA kernels need not be deterministic
    # one intra-op thread each: two processes share two cores without spinning against each other (the same
    # setting for every run; results with the default thread count matched too, they just took longer)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _start(project: Path, log: str, *extra: str) -> subprocess.Popen:
    """`g2d pretrain` in `project`, its output in `project/<log>.log` (a pipe nobody reads could block it)."""
    command = [sys.executable, "-m", "g2d.cli", "pretrain", *(a for o in OVERRIDES for a in ("--set", o)), *extra]
    path = project / f"{log}.log"
    with path.open("w") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(command, cwd=project, env=_env(project), stdout=out, stderr=subprocess.STDOUT)
    proc.log_path = path
    return proc


def _tail(proc: subprocess.Popen, n: int = 3000) -> str:
    return f"exit {proc.returncode}; output:\n{proc.log_path.read_text(errors='replace')[-n:]}"


def _wait(proc: subprocess.Popen) -> None:
    proc.wait(timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{proc.args} failed: {_tail(proc)}"


def _pretrain_runs(project: Path) -> list[tuple]:
    """(run, [(step, loss/total)]) of each pre-training run in the project's store, oldest first."""
    client = MlflowClient(tracking_uri=f"sqlite:///{(project / 'mlflow.db').as_posix()}")
    exp = client.get_experiment_by_name("g2d-pretrain")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    return [(r, sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, "loss/total")))
            for r in runs]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_kill_9_mid_pretraining_then_resume_gives_the_uninterrupted_weights(rendered, mlflow_template_db, tmp_path,
                                                                           monkeypatch):
    reference_dir = _project(rendered, mlflow_template_db, tmp_path / "reference")
    project = _project(rendered, mlflow_template_db, tmp_path / "killed")
    monkeypatch.chdir(project)  # where the stage puts its outputs
    monkeypatch.delenv("DVC_ROOT", raising=False)
    _, out, ckpt_dir, metrics_path = pretrain.paths(load_params(project / "params.yaml", list(OVERRIDES)))
    ckpt = ckpt_dir / pretrain.CHECKPOINT
    started: list[subprocess.Popen] = []
    try:
        reference = _start(reference_dir, "uninterrupted")
        started.append(reference)
        killed = _start(project, "killed")
        started.append(killed)

        # kill -9 as soon as the first checkpoint (step CHECKPOINT_EVERY) is in place: no handler, no cleanup runs
        deadline = time.monotonic() + TIMEOUT_S
        while not ckpt.exists() and killed.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=60)
        assert ckpt.exists(), f"no checkpoint after {TIMEOUT_S} s: {_tail(killed)}"
        assert killed.returncode == -signal.SIGKILL, f"the run was not killed mid-training: {_tail(killed)}"
        assert not (out / "model.safetensors").exists() and not metrics_path.exists(), \
            "the run had finished before the kill: nothing was interrupted"
        killed_at = int(torch.load(ckpt, map_location="cpu", weights_only=True)["step"])
        assert killed_at % CHECKPOINT_EVERY == 0 and 0 < killed_at < TOTAL, killed_at

        resumed = _start(project, "resumed", "--resume")
        started.append(resumed)
        _wait(resumed)
        _wait(reference)
    finally:
        for proc in started:  # a failed assertion must not leave a training process behind
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    # the weights: same tensors, bit for bit
    want = load_file(reference_dir / out.relative_to(project) / "model.safetensors")
    got = load_file(out / "model.safetensors")
    assert got.keys() == want.keys()
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{len(differ)} of {len(want)} tensors differ after the resume, e.g. {differ[:5]}"
    # and everything exported from them: the metrics file and the model folder, byte for byte
    assert metrics_path.read_bytes() == (reference_dir / metrics_path.relative_to(project)).read_bytes()
    assert _files(out) == _files(reference_dir / out.relative_to(project))

    # it really resumed: a second run, tagged with the checkpoint's step, logged only the steps after it, with the
    # uninterrupted run's losses; the killed run (SIGKILL runs no handler: the resumed run closed it) logged the
    # ones before
    [(_, ref_losses)] = _pretrain_runs(reference_dir)
    (first, first_losses), (last, last_losses) = _pretrain_runs(project)
    assert first.info.status == "KILLED" and last.info.status == "FINISHED"
    assert last.data.tags["g2d.resumes_run"] == first.info.run_id
    assert first.data.tags["g2d.resumed_from_step"] == "0"
    assert last.data.tags["g2d.resumed_from_step"] == str(killed_at)
    assert [s for s, _ in last_losses] == list(range(killed_at + 1, TOTAL + 1))
    assert last_losses == ref_losses[killed_at:]
    assert first_losses[:killed_at] == ref_losses[:killed_at]
    assert int(torch.load(ckpt, map_location="cpu", weights_only=True)["step"]) == TOTAL
