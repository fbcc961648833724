"""g2d against a production store: PostgreSQL from Debian's packages on 127.0.0.1 (its own data folder, a free
port), directly and behind a real `mlflow server` with an artifact root. Nothing in g2d may assume SQLite: the
SQLite-only retries and lock file must stay out of the way.

Needs PostgreSQL's server binaries (Debian: `apt-get install postgresql`; `.ci/run` installs them). Without them
the tests are skipped, unless G2D_REQUIRE_POSTGRES=1 (set by `.ci/run`) turns the skip into a failure."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from g2d import tracking
from g2d.errors import RegistryError, TrackingError
from g2d.tracking import store
from tests.conftest import _TRACKING_ENV, free_port, mlflow_server, tiny_synthcxr_project
from tests.test_zeroshot import _gradient

PROMPTS = ["lung opacity", "no lung opacity"]


def _postgres_bin() -> Path | None:
    """The folder of initdb / pg_ctl: $G2D_POSTGRES_BIN, `pg_config --bindir`, or Debian's newest version."""
    if os.environ.get("G2D_POSTGRES_BIN"):
        return Path(os.environ["G2D_POSTGRES_BIN"])
    if shutil.which("pg_config"):
        folder = Path(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip())
        if (folder / "initdb").is_file():
            return folder
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


def _as_owner(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as Debian's `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A PostgreSQL server of our own on a free port with an empty database `mlflow`; yields its URI."""
    import psycopg

    bin_dir = _postgres_bin()
    if bin_dir is None:
        if os.environ.get("G2D_REQUIRE_POSTGRES") == "1":
            pytest.fail("PostgreSQL's server binaries are not installed (apt-get install postgresql)")
        pytest.skip("PostgreSQL's server binaries are not installed (apt-get install postgresql)")
    # not under pytest's tmp folder: that is private to root, and the server runs as `postgres`
    folder = Path(tempfile.mkdtemp(prefix="g2d-postgres-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
    data, port = folder / "data", free_port()
    subprocess.run(_as_owner([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                              "-E", "UTF8", "--no-sync"]), check=True, capture_output=True)
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    started = subprocess.run(_as_owner([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"),
                                        "-o", options, "-w", "start"]), capture_output=True, text=True)
    try:
        assert started.returncode == 0, started.stderr + (folder / "log").read_text()
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE mlflow")
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(_as_owner([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SQLite retries start when an error reads as a locked store: on PostgreSQL none may."""
    is_locked = store._is_locked

    def refuse(exc: BaseException | None) -> bool:
        assert not is_locked(exc), f"g2d took a PostgreSQL error for a locked SQLite store: {exc}"
        return False

    monkeypatch.setattr(store, "_is_locked", refuse)


def test_runs_registry_and_pulls_straight_on_postgresql(postgres, project_dir, tmp_path, monkeypatch):
    """A `postgresql://` tracking URI (no server): runs, registration, aliases, a pull, the errors of a missing
    model; no lock file, no retry waits, artifacts under the project's mlartifacts."""
    from mlflow import MlflowClient

    from tests.test_tracking import _assert_same_tensors, _save_tiny_model

    root = project_dir
    monkeypatch.setenv("MLFLOW_TRACKING_URI", postgres)
    _no_waiting(monkeypatch)
    with tracking.start_run("pretrain", config={"lr": 0.001}, data_hash="abc") as run:
        run.log_metrics({"loss": 0.5}, step=1)
        state = _save_tiny_model(tmp_path / "m", seed=3)
        assert tracking.register_model_dir(run, tmp_path / "m", "enc-pg") == 1
    tracking.promote("enc-pg", 1, "champion")
    _assert_same_tensors(tracking.pull_model("enc-pg@champion", tmp_path / "pulled"), state)
    got = MlflowClient(tracking_uri=postgres, registry_uri=postgres).get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.data.metrics["loss"] == 0.5
    assert got.info.artifact_uri.startswith((root / "mlartifacts").as_uri())
    assert tracking.find_runs("pretrain", {"g2d.data_hash": "abc"})[0]["run_id"] == run.run_id
    with pytest.raises(RegistryError, match=r"model 'enc-pg' has no alias 'staging'; aliases: champion->1"):
        tracking.pull_model("enc-pg@staging", tmp_path / "x")
    with pytest.raises(RegistryError, match=r"no registered model 'nope' in postgresql://postgres@127.0.0.1:"):
        tracking.resolve_model("nope")
    assert not list(root.glob("*-lock")) and not (root / "mlflow.db").exists()


def test_an_unreachable_database_fails_fast_naming_it(tmp_path, monkeypatch):
    port = free_port()  # nothing listens there
    uri = f"postgresql://g2d:secret@127.0.0.1:{port}/mlflow"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    with pytest.raises(TrackingError, match=rf"cannot reach the database of MLflow tracking URI "
                       rf"postgresql://g2d:\*\*\*@127.0.0.1:{port}/mlflow at 127.0.0.1:{port} \(") as e:
        tracking.start_run("pretrain", config={}).__enter__()
    assert "secret" not in str(e.value)
    assert time.monotonic() - started < 10  # not MLflow's minutes of engine retries


@pytest.mark.slow
def test_the_tiny_pipeline_against_an_mlflow_server_on_postgresql(postgres, tmp_path, monkeypatch):
    """What a team with a shared server does: pre-train, fine-tune, promote, pull and load with mlflow.pyfunc,
    everything through `mlflow server` on PostgreSQL with its own artifact root."""
    import mlflow
    import psycopg
    from typer.testing import CliRunner

    import g2d
    from g2d.cli import app

    root = tmp_path / "project"
    tiny_synthcxr_project(root)
    for var in _TRACKING_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(root)
    with mlflow_server(postgres, tmp_path) as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
        runner = CliRunner()
        pull = ["models", "pull", "g2d-encoder@champion", "--out", str(tmp_path / "pull")]
        for args in (["pretrain"], ["train", "--task", "siim-seg", "--frac", "1.0", "--init", "g2d"],
                     ["models", "promote"], pull):
            done = runner.invoke(app, args)
            assert done.exit_code == 0, (args, done.output)
        assert tracking.resolve_model("g2d-encoder@champion").version == 1

        img = _gradient()
        encoder = mlflow.pyfunc.load_model("models:/g2d-encoder@champion")
        [answer] = encoder.predict(pd.DataFrame({"image": [_png(img)], "prompts": [PROMPTS]}))
        want = g2d.predict(img, PROMPTS, model=g2d.load_model(tmp_path / "pull" / "model"))
        assert np.allclose(answer["scores"], want.scores, atol=1e-6)
        [seg] = mlflow.pyfunc.load_model("models:/g2d-siim-seg/latest").predict(pd.DataFrame({"image": [_png(img)]}))
        assert np.asarray(seg["mask"]).shape == img.shape

    # everything went to the server: its tables in PostgreSQL, its artifact root; nothing written locally
    with psycopg.connect(postgres) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM registered_models")}
        runs = conn.execute("SELECT count(*) FROM runs WHERE status = 'FINISHED'").fetchone()[0]
        champion = conn.execute("SELECT version FROM registered_model_aliases WHERE alias = 'champion'").fetchone()
    assert {"g2d-encoder", "g2d-siim-seg"} <= names and runs >= 2 and champion == (1,)
    assert any((tmp_path / "server-artifacts").rglob("model.safetensors"))
    assert not (root / "mlflow.db").exists() and not (root / "mlartifacts").exists()
