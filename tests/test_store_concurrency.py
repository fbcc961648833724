"""Several writers on one SQLite MLflow store: parallel DVC experiments (`dvc exp run --run-all -j 2`)
must neither fail on "database is locked" nor leave the store damaged."""

from __future__ import annotations

import inspect
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from g2d import tracking
from g2d.errors import TrackingError
from g2d.tracking import store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def short_sqlite_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow lets SQLite wait 20 s for a lock before it fails a call; 0.2 s here, so that a lock
    held for a second or two reaches g2d's retry and the tests stay short."""
    import sqlalchemy
    from mlflow.store.db import utils

    pragma = "PRAGMA busy_timeout = 20000;"
    assert pragma in inspect.getsource(utils._get_managed_session_maker), "MLflow changed how it sets the wait"
    monkeypatch.setattr(utils, "sql", SimpleNamespace(
        text=lambda statement: sqlalchemy.text(statement.replace(pragma, "PRAGMA busy_timeout = 200;"))))


def _write_lock(db: Path) -> sqlite3.Connection:
    """What another writer in the middle of a transaction looks like: nobody else may read or write."""
    con = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    con.execute("BEGIN EXCLUSIVE")
    return con


def _release(con: sqlite3.Connection) -> None:
    con.execute("ROLLBACK")
    con.close()


def _model(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "model_card.json").write_text(text)
    return folder


def test_a_call_on_a_locked_store_goes_through_once_the_lock_is_gone(
    mlflow_uri: str, project_dir: Path, short_sqlite_wait: None, tmp_path: Path
) -> None:
    db = project_dir / "mlflow.db"
    with tracking.start_run("data", config={"a": 1}) as run:
        lock = _write_lock(db)
        threading.Timer(1.5, _release, [lock]).start()
        started = time.monotonic()
        run.log_metrics({"loss": 0.5}, step=3)  # MLflow alone fails this after 0.2 s
        assert time.monotonic() - started >= 1.0
        version = tracking.register_model_dir(run, _model(tmp_path / "m", "{}"), "enc", aliases=["champion"])
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri, registry_uri=mlflow_uri)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.data.metrics["loss"] == 0.5
    assert version == 1 and client.get_model_version_by_alias("enc", "champion").run_id == run.run_id


def test_a_store_locked_past_the_budget_is_a_tracking_error_naming_it(
    mlflow_uri: str, project_dir: Path, short_sqlite_wait: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "_LOCKED_RETRY_S", 1.0)
    db = project_dir / "mlflow.db"
    with tracking.start_run("data", config={}) as run:
        lock = _write_lock(db)
        started = time.monotonic()
        try:
            with pytest.raises(TrackingError) as err:
                run.log_metrics({"loss": 0.5}, step=1)
        finally:
            _release(lock)
        assert time.monotonic() - started < 5
    message = str(err.value)
    assert f"MLflow store {db} stayed locked by another process" in message
    assert "--run-all -j 1" in message
    from mlflow import MlflowClient

    assert MlflowClient(mlflow_uri).get_run(run.run_id).info.status == "FINISHED"  # closed once the lock went


# --------------------------------------------------------------------------- the real thing

HAMMER = '''\
"""One experiment's stage: a run with many metric steps, an artifact and a model version."""
import os
import tempfile
import time
from pathlib import Path

import yaml

from g2d import tracking

params = yaml.safe_load(Path("params.yaml").read_text())
# DVC starts the two stages seconds apart; meet first, so that both open the new store together
project = Path(os.environ["DVC_ROOT"])
(project / f"arrived-{params['tag']}").touch()
deadline = time.monotonic() + 60
while len(list(project.glob("arrived-*"))) < 2 and time.monotonic() < deadline:
    time.sleep(0.05)
with tracking.start_run("hammer", config=params) as run:
    # and meet again with both runs open, so that their writes interleave however slowly the other one started
    (project / f"running-{params['tag']}").touch()
    deadline = time.monotonic() + 120
    while len(list(project.glob("running-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    for step in range(params["steps"]):
        run.log_metrics({"loss": 1 / (step + 1), "acc": step / params["steps"]}, step=step)
    model = Path(tempfile.mkdtemp()) / "model"
    model.mkdir()
    (model / "model_card.json").write_text(params["tag"])
    run.log_artifact(model / "model_card.json")
    tracking.register_model_dir(run, model, "g2d-hammer", aliases=[f"exp-{params['tag']}"])
'''

DVC_YAML = """\
stages:
  hammer:
    cmd: python hammer.py
    deps: [hammer.py]
    params: [tag, steps]
"""


def _sh(*cmd: str, cwd: Path, env: dict) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.mark.slow
def test_two_queued_experiments_in_parallel_share_one_new_store(tmp_path: Path) -> None:
    """What a user gets by default: no MLFLOW_TRACKING_URI, no mlflow.db yet, two experiments queued and
    run two at a time. DVC runs each in a copy of the workspace under .dvc/tmp/exps but points DVC_ROOT at
    the project, so both write `<project>/mlflow.db`: one creates it while the other waits, and then
    they write to it side by side."""
    steps = 100
    repo = tmp_path / "project"
    repo.mkdir()
    (repo / "hammer.py").write_text(HAMMER)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "params.yaml").write_text(f"tag: base\nsteps: {steps}\n")
    (repo / ".gitignore").write_text("mlflow.db\nmlflow.db-*\n/mlartifacts\n/arrived-*\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(PYTHONPATH=str(ROOT), DVC_NO_ANALYTICS="1")
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    _sh("git", "init", "-q", cwd=repo, env=env)
    _sh("dvc", "init", "-q", cwd=repo, env=env)
    _sh("git", "add", "-A", cwd=repo, env=env)
    _sh("git", "commit", "-qm", "hammer", cwd=repo, env=env)
    for tag in ("a", "b"):
        _sh("dvc", "exp", "run", "--queue", "-n", f"exp-{tag}", "-S", f"tag={tag}", cwd=repo, env=env)
    _sh("dvc", "exp", "run", "--run-all", "-j", "2", cwd=repo, env=env)

    status = _sh("dvc", "queue", "status", cwd=repo, env=env)
    for name in ("exp-a", "exp-b"):  # `--run-all` itself exits 0 when an experiment fails
        if not re.search(rf"\b{name}\b.*\bSuccess\b", status):
            logs = subprocess.run(["dvc", "queue", "logs", name], cwd=repo, env=env, capture_output=True, text=True)
            pytest.fail(f"{status}\n{name}'s log:\n{logs.stdout[-4000:]}{logs.stderr[-2000:]}")
    db = repo / "mlflow.db"
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert not con.execute("SELECT name FROM sqlite_master WHERE name LIKE '\\_alembic\\_tmp%' ESCAPE '\\'"
                               ).fetchall()

    from mlflow import MlflowClient

    uri = f"sqlite:///{db}"
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.get_experiment_by_name("g2d-hammer")
    runs = {r.info.run_name.split("/")[0]: r for r in client.search_runs([exp.experiment_id])}
    assert {r.info.run_name for r in runs.values()} == {"exp-a/hammer", "exp-b/hammer"}  # EXPERIMENT/STAGE
    for name, run in runs.items():
        assert run.info.status == "FINISHED", name
        assert run.data.params["tag"] == name[-1]
        history = client.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in history) == list(range(steps)), name
    a, b = runs["exp-a"].info, runs["exp-b"].info
    assert a.start_time < b.end_time and b.start_time < a.end_time, "the two experiments did not overlap"

    versions = {mv.run_id: int(mv.version) for mv in client.search_model_versions("name='g2d-hammer'")}
    assert sorted(versions.values()) == [1, 2]
    for name, run in runs.items():
        alias = client.get_model_version_by_alias("g2d-hammer", f"exp-{name[-1]}")
        assert int(alias.version) == versions[run.info.run_id]
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))  # nothing tracked into a throwaway copy
