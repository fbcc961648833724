"""Fixtures shared by all g2d tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

# The suite runs on pytest-xdist workers (`-n auto` in pyproject.toml), one per core: each worker, and the
# g2d / dvc processes its tests start, gets its share of the cores instead of one OpenMP thread per core.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

# Environment that changes where g2d tracks or how it names runs; cleared for every test that
# uses a project so a developer's shell (or a `dvc exp run`) cannot leak into the results.
_TRACKING_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME")


@pytest.fixture(scope="session")
def mlflow_template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, fully migrated MLflow SQLite store, built once per session.

    Creating a store runs MLflow's Alembic migrations (seconds); copying the file is instant."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    uri = f"sqlite:///{path.as_posix()}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.search_experiments()  # migrates the tracking tables
    client.search_registered_models()  # and the registry's
    return path


@pytest.fixture
def project_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh project folder (holding an empty dvc.yaml) as the cwd, so `project_root()`
    resolves to it and nothing is written into the real checkout."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "dvc.yaml").write_text("")
    for var in _TRACKING_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(root)
    return root


@pytest.fixture
def mlflow_uri(project_dir: Path, mlflow_template_db: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A private MLflow store for this test (a copy of the template at
    `<project>/mlflow.db`), exported as MLFLOW_TRACKING_URI."""
    db = project_dir / "mlflow.db"
    shutil.copyfile(mlflow_template_db, db)
    uri = f"sqlite:///{db.as_posix()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def tiny_synthcxr_project(root: Path):
    """A project folder at `root` with params.tiny.yaml as params.yaml and its SynthCXR rendered;
    returns the params."""
    from g2d.config import load_params
    from g2d.data.sources import embedded
    from g2d.data.synthcxr import build

    root.mkdir(parents=True)
    (root / "dvc.yaml").write_text("")
    shutil.copy(Path(__file__).resolve().parents[1] / "params.tiny.yaml", root / "params.yaml")
    params = load_params(root / "params.yaml")
    embedded.fetch(root / "data")
    build.build(params.synth, root / "data", root / params.paths.synthcxr)
    return params


def tiny_project_with_store(root: Path, mlflow_template_db: Path) -> Path:
    """tiny_synthcxr_project with an empty MLflow store of its own (`root/mlflow.db`); nothing trained."""
    tiny_synthcxr_project(root)
    shutil.copyfile(mlflow_template_db, root / "mlflow.db")
    return root


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory: pytest.TempPathFactory, mlflow_template_db: Path) -> Path:
    """params.tiny.yaml, its SynthCXR rendered and a tiny G2D pre-trained (`models/pretrain`, registered as
    g2d-encoder version 1); one per test module."""
    from g2d.pipeline.pretrain import stage as pretrain

    root = tmp_path_factory.mktemp("pretrained") / "project"
    params = tiny_synthcxr_project(root)
    shutil.copyfile(mlflow_template_db, root / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        pretrain.run(params)
    shutil.copyfile(root / "mlflow.db", root / "pretrained.db")
    return root


@pytest.fixture
def project(tiny_project: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The tiny project as the cwd, with a store as right after pre-training and no downstream metrics.
    Each test gets its own store file: MLflow keeps one engine per URI, so a file replaced under it would
    go stale."""
    for var in _TRACKING_ENV:
        monkeypatch.delenv(var, raising=False)
    db = tiny_project / f"mlflow-{tmp_path.name}.db"
    shutil.copyfile(tiny_project / "pretrained.db", db)
    for folder in ("finetune", "zeroshot", "grounding"):
        shutil.rmtree(tiny_project / "metrics" / folder, ignore_errors=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.chdir(tiny_project)
    return tiny_project


def torchrun(*args: str, cwd: Path, env: dict | None = None, ranks: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 ARGS` (gloo on CPU), one intra-op thread per rank, no DVC
    variables from the caller's shell; asserts it succeeded."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(ranks), *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("DVC_")},
                               "OMP_NUM_THREADS": "1", **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(backend_uri: str, folder: Path) -> Iterator[str]:
    """A real `mlflow server` on a free local port over ``backend_uri``, its artifacts under ``folder``; yields
    its http URI and ends the whole process group (uvicorn and its helpers) afterwards."""
    port = free_port()
    log_path = folder / "server.log"
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--backend-store-uri", backend_uri,
        "--artifacts-destination", str(folder / "server-artifacts"),
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        uri = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                        if resp.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not come up:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.25)
            yield uri
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)



def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules marked slow as a whole (the end-to-end `dvc repro`) first, then modules holding a slow test: with one
    module per xdist worker (`--dist loadfile --no-loadscope-reorder`), the longest starts at once instead of
    leaving the other worker idle at the end. The order within a module is kept."""
    ranks: dict[str, int] = {}
    for item in items:
        marks = getattr(item.module, "pytestmark", [])
        whole = any(m.name == "slow" for m in (marks if isinstance(marks, list) else [marks]))
        rank = 0 if whole else 1 if item.get_closest_marker("slow") else 2
        ranks[item.module.__name__] = min(rank, ranks.get(item.module.__name__, 2))
    items.sort(key=lambda item: ranks[item.module.__name__])
