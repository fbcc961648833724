"""g2d.tracking against real MLflow stores: a private SQLite copy per test, and one live server."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from g2d import tracking
from g2d.errors import RegistryError, TrackingError
from g2d.tracking import runs
from tests.conftest import free_port, mlflow_server


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _save_tiny_model(folder: Path, seed: int) -> dict:
    """A real (tiny) torch model as safetensors + a model card: what stages register."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in torch.nn.Linear(4, 2).state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "model_card.json").write_text(json.dumps({"arch": "linear", "seed": seed}))
    return state


def _assert_same_tensors(folder: Path, expected: dict) -> None:
    import torch
    from safetensors.torch import load_file

    loaded = load_file(str(folder / "model.safetensors"))
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


# --------------------------------------------------------------------------- locations


def test_default_uri_is_absolute_sqlite_at_project_root(project_dir: Path) -> None:
    expected = f"sqlite:///{project_dir.resolve().as_posix()}/mlflow.db"
    assert tracking.tracking_uri() == expected
    sub = project_dir / "stages" / "deep"
    sub.mkdir(parents=True)
    os.chdir(sub)  # DVC may run a stage in a sub-folder; the store stays at the root
    assert tracking.project_root() == project_dir.resolve()
    assert tracking.tracking_uri() == expected
    assert (
        tracking.tracking_uri("sqlite:///runs/x.db")
        == f"sqlite:///{project_dir.resolve().as_posix()}/runs/x.db"
    )


def test_env_uri_overrides_configured(project_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert tracking.tracking_uri("http://example:5000") == "http://example:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1234")
    assert tracking.tracking_uri("http://example:5000") == "http://127.0.0.1:1234"
    assert tracking.tracking_uri() == "http://127.0.0.1:1234"


def test_the_store_follows_dvc_root_and_the_files_the_cwd(project_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`dvc exp run --queue` runs a stage in a temporary copy of the workspace with DVC_ROOT at the user's
    project: the stage's files are the copy's (DVC collects them), its runs go to the user's store."""
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    (project_dir / "sub").mkdir()
    monkeypatch.chdir(project_dir / "sub")
    assert tracking.project_root() == project_dir.resolve()
    assert tracking.store_root() == tmp_path.resolve()
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve().as_posix()}/mlflow.db"
    assert tracking.tracking_uri("sqlite:///stores/x.db") == f"sqlite:///{tmp_path.resolve().as_posix()}/stores/x.db"


def test_missing_sqlite_folder_is_named(project_dir: Path) -> None:
    with pytest.raises(TrackingError, match="nowhere/sub.*does not exist"):
        tracking.check_reachable(f"sqlite:///{project_dir}/nowhere/sub/m.db")


# --------------------------------------------------------------------------- runs


def test_run_records_provenance_params_and_config(mlflow_uri: str, project_dir: Path, monkeypatch) -> None:
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=project_dir, check=True)
    subprocess.run([*git, "add", "dvc.yaml"], cwd=project_dir, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], cwd=project_dir, check=True)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=project_dir, capture_output=True, text=True, check=True
    ).stdout.strip()
    monkeypatch.setenv("DVC_STAGE", "pretrain@0")
    monkeypatch.setenv("DVC_EXP_NAME", "lucid-lark")
    model = {"dim": 128, "layers": [1, 2, 3], "opts": {}}
    config = {"model": model, "seed": 7, "path": Path("x"), "long": "y" * 7000}

    with tracking.start_run("pretrain", config=config, data_hash="d" * 64, tags={"extra": 1}) as run:
        run.log_metrics({"loss": 1.5, "acc": 0.25}, step=3)
        run.log_metric("loss", 1.0, step=4)
        run.set_tag("note", "hello")
    assert run.experiment_name == "g2d-pretrain"

    client = _client(mlflow_uri)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.info.run_name == "lucid-lark/pretrain@0"  # the experiment's runs told apart by their stage
    tags = got.data.tags
    assert tags["g2d.job"] == "pretrain"
    assert tags["g2d.git_commit"] == commit == tags["mlflow.source.git.commit"]
    assert tags["g2d.git_dirty"] == "false"
    assert tags["g2d.dvc_stage"] == "pretrain@0"
    assert tags["g2d.dvc_exp"] == "lucid-lark"
    assert tags["g2d.data_hash"] == "d" * 64
    assert tags["extra"] == "1" and tags["note"] == "hello"
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.user"]
    # where it ran, so a rerun's drift on another machine is told from a change
    assert f"{os.cpu_count()} cpus" in tags["g2d.machine"]
    assert f"torch=={importlib.metadata.version('torch')}" in tags["g2d.packages"].split()
    params = got.data.params
    assert params["model.dim"] == "128"
    assert params["model.layers"] == "[1, 2, 3]"
    assert params["model.opts"] == "{}"
    assert params["seed"] == "7" and params["path"] == "x"
    assert len(params["long"]) == 6000
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "loss")] == [(3, 1.5), (4, 1.0)]

    exp = client.get_experiment_by_name("g2d-pretrain")
    assert exp.artifact_location == (project_dir.resolve() / "mlartifacts" / "g2d-pretrain").as_uri()
    local = Path(client.download_artifacts(run.run_id, "config.yaml", str(project_dir / "dl")))
    assert yaml.safe_load(local.read_text())["model"] == model


def test_experiments_open_on_their_training_runs_in_the_ui(mlflow_uri: str) -> None:
    """The UI picks an experiment's page by `mlflow.experimentKind`; an experiment made before the tag gets it."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    old = client.create_experiment("g2d-train")  # as an older g2d left it: untagged
    with tracking.start_run("pretrain", config={}):
        pass
    with tracking.start_run("train", config={}):
        pass
    for name in ("g2d-pretrain", "g2d-train"):
        assert client.get_experiment_by_name(name).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment_by_name("g2d-train").experiment_id == old


def test_run_name_from_stage_or_timestamp(mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with tracking.start_run("data", config={}) as plain:
        pass
    monkeypatch.setenv("DVC_STAGE", "render")
    with tracking.start_run("data", config={}) as staged:
        pass
    client = _client(mlflow_uri)
    assert client.get_run(plain.run_id).info.run_name.startswith("data-")
    assert client.get_run(plain.run_id).data.tags["g2d.git_commit"] == "unknown"  # not a git repo
    assert client.get_run(staged.run_id).info.run_name == "render"


def test_failing_body_ends_failed_and_reraises(mlflow_uri: str) -> None:
    with pytest.raises(ValueError, match="boom"):
        with tracking.start_run("data", config={"a": 1}) as run:
            raise ValueError("boom")
    assert _client(mlflow_uri).get_run(run.run_id).info.status == "FAILED"


def test_keyboard_interrupt_ends_killed(mlflow_uri: str) -> None:
    with pytest.raises(KeyboardInterrupt):
        with tracking.start_run("data", config={}) as run:
            raise KeyboardInterrupt
    assert _client(mlflow_uri).get_run(run.run_id).info.status == "KILLED"


def test_sigterm_ends_killed_and_restores_handler(mlflow_uri: str) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(tracking.Terminated):
        with tracking.start_run("data", config={}) as run:
            assert signal.getsignal(signal.SIGTERM) is not before
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises long before this ends
    assert signal.getsignal(signal.SIGTERM) is before
    assert _client(mlflow_uri).get_run(run.run_id).info.status == "KILLED"


def test_sigterm_while_closing_is_delivered_after(mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGTERM that lands while the run is being closed must not leave it RUNNING: it is held
    back, the run is closed, and the signal then reaches the handler that was there before."""
    received = []
    real_terminate = runs._terminate

    def terminate_under_fire(client, run_id, status):
        os.kill(os.getpid(), signal.SIGTERM)
        real_terminate(client, run_id, status)

    monkeypatch.setattr(runs, "_terminate", terminate_under_fire)
    old = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with tracking.start_run("data", config={}) as run:
            pass
    finally:
        signal.signal(signal.SIGTERM, old)
    assert received == [signal.SIGTERM]
    assert _client(mlflow_uri).get_run(run.run_id).info.status == "FINISHED"


def test_dataset_input_keeps_our_digest(mlflow_uri: str) -> None:
    digest = "ab" * 32  # a sha256: longer than MLflow's 36-character digest column
    with tracking.start_run("data", config={}) as run:
        run.log_dataset(
            "synthcxr-pretrain",
            source="data/synthcxr/pretrain.parquet",
            digest=digest,
            context="train",
            schema={"image": "string", "report": "string"},
            profile={"rows": 12},
        )
    inputs = _client(mlflow_uri).get_run(run.run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    ds = inputs[0].dataset
    assert ds.name == "synthcxr-pretrain"
    assert ds.digest == digest[:36]
    assert json.loads(ds.source) == {"uri": "data/synthcxr/pretrain.parquet"}
    assert json.loads(ds.profile) == {"rows": 12}
    assert "image" in ds.schema
    tags = {t.key: t.value for t in inputs[0].tags}
    assert tags == {"mlflow.data.context": "train", "g2d.digest": digest}


def test_artifacts_dicts_and_images(mlflow_uri: str, tmp_path: Path) -> None:
    from PIL import Image

    png = tmp_path / "overlay.png"
    Image.new("L", (8, 8), 128).save(png)
    report = tmp_path / "report.md"
    report.write_text("# hi")
    with tracking.start_run("eval", config={}) as run:
        run.log_artifact(report)
        run.log_artifact(report, "reports")
        run.log_dict({"dice": 0.5}, "metrics/summary.json")
        run.log_image(png)
        run.log_figure(png, "plots/overlay.png")
        run.log_image(png, key="pseudo_mask", step=2)
        with pytest.raises(TrackingError, match="nope.png"):
            run.log_image(tmp_path / "nope.png")
    client = _client(mlflow_uri)

    def paths(folder: str | None = None) -> set[str]:
        return {f.path for f in client.list_artifacts(run.run_id, folder)}

    assert {"config.yaml", "report.md", "reports", "metrics", "images", "plots"} <= paths()
    assert paths("images") >= {"images/overlay.png"}
    assert paths("plots") == {"plots/overlay.png"}
    assert paths("metrics") == {"metrics/summary.json"}


# --------------------------------------------------------------------------- registry


@pytest.fixture
def registered(mlflow_uri: str, tmp_path: Path) -> dict:
    """Model 'enc' with versions 1 (alias champion) and 2, each a distinct tiny safetensors model."""
    states = {}
    with tracking.start_run("pretrain", config={}, data_hash="h1") as run:
        states[1] = _save_tiny_model(tmp_path / "m1", seed=1)
        assert tracking.register_model_dir(run, tmp_path / "m1", "enc", aliases=["champion"]) == 1
    with tracking.start_run("pretrain", config={}) as run:
        states[2] = _save_tiny_model(tmp_path / "m2", seed=2)
        assert tracking.register_model_dir(run, tmp_path / "m2", "enc") == 2
    return states


def test_register_list_pull_round_trip(registered: dict, mlflow_uri: str, tmp_path: Path) -> None:
    [row] = tracking.list_models()
    assert row["name"] == "enc"
    assert row["latest_version"] == 2 and row["versions"] == [1, 2]
    assert row["aliases"] == {"champion": 1}
    assert row["last_updated"]

    cases = {"enc@champion": 1, "enc/1": 1, "enc/2": 2, "enc/latest": 2, "enc": 2, "models:/enc@champion": 1}
    for i, (ref, version) in enumerate(cases.items()):
        folder = tracking.pull_model(ref, tmp_path / f"pull{i}")
        assert (folder / "model_card.json").is_file(), ref
        assert json.loads((folder / "model_card.json").read_text())["seed"] == version, ref
        _assert_same_tensors(folder, registered[version])

    mv = _client(mlflow_uri).get_model_version("enc", "1")
    assert mv.tags["g2d.data_hash"] == "h1" and mv.tags["g2d.job"] == "pretrain"
    info = tracking.resolve_model("enc@champion")
    assert (info.version, info.aliases) == (1, ("champion",))


def test_a_registered_model_carries_its_metrics_and_lists_its_version(mlflow_uri: str, tmp_path: Path) -> None:
    client = _client(mlflow_uri)
    with tracking.start_run("finetune", config={}) as run:
        _save_tiny_model(tmp_path / "m1", seed=1)
        tracking.register_model_dir(run, tmp_path / "m1", "enc", metrics={"test/score": 0.5}, step=3)
    [output] = client.get_run(run.run_id).outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert [(m.key, m.value, m.step) for m in model.metrics] == [("test/score", 0.5, 3)]
    assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": "enc", "version": "1"}]
    assert client.get_run(run.run_id).data.metrics == {"test/score": 0.5}  # logged once, as the run's too


def test_promote_moves_alias(registered: dict) -> None:
    tracking.promote("enc", 2, "champion")
    assert tracking.resolve_model("enc@champion").version == 2
    with pytest.raises(RegistryError, match=r"model 'enc' has no version 9; aliases: champion->2"):
        tracking.promote("enc", 9, "champion")


def test_missing_model_alias_version_are_named(registered: dict, tmp_path: Path) -> None:
    missing = r"no registered model 'nope' in sqlite:///.*; registered models: enc"
    with pytest.raises(RegistryError, match=missing):
        tracking.pull_model("nope@champion", tmp_path / "x")
    with pytest.raises(RegistryError) as err:
        tracking.pull_model("enc@staging", tmp_path / "x")
    assert str(err.value) == (
        "model 'enc' has no alias 'staging'; aliases: champion->1, latest->2 (newest version, not an alias); "
        "versions: 1, 2"
    )
    with pytest.raises(RegistryError, match=r"model 'enc' has no version 5; .*versions: 1, 2"):
        tracking.pull_model("enc/5", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_no_models_yet_is_explained(mlflow_uri: str, tmp_path: Path) -> None:
    assert tracking.list_models() == []
    with pytest.raises(RegistryError, match="registered models: none yet"):
        tracking.pull_model("enc", tmp_path / "x")


def test_latest_alias_is_refused(registered: dict, tmp_path: Path, mlflow_uri: str) -> None:
    with pytest.raises(RegistryError, match="alias 'latest' is reserved.*models:/NAME/latest"):
        tracking.promote("enc", 1, "latest")
    with tracking.start_run("pretrain", config={}) as run:
        _save_tiny_model(tmp_path / "m3", seed=3)
        with pytest.raises(RegistryError, match="alias 'Latest' is reserved"):
            tracking.register_model_dir(run, tmp_path / "m3", "enc", aliases=["Latest"])
        with pytest.raises(RegistryError, match="empty.*is not a folder with files"):
            tracking.register_model_dir(run, tmp_path / "empty", "enc")
    assert tracking.list_models()[0]["versions"] == [1, 2]  # nothing was registered
    # `latest` is no alias MLflow lets anyone set; NAME@latest therefore reads as the newest version
    assert tracking.parse_model_ref("enc@latest") == tracking.parse_model_ref("enc/latest")


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("enc", tracking.ModelRef("enc")),
        ("enc/latest", tracking.ModelRef("enc")),
        ("enc/3", tracking.ModelRef("enc", version=3)),
        ("enc@champion", tracking.ModelRef("enc", alias="champion")),
        ("models:/enc@champion", tracking.ModelRef("enc", alias="champion")),
        ("models:/enc/latest", tracking.ModelRef("enc")),
        ("models:/enc@latest", tracking.ModelRef("enc")),
        (" g2d-resnet50.v1/12 ", tracking.ModelRef("g2d-resnet50.v1", version=12)),
    ],
)
def test_parse_model_ref(ref: str, expected: tracking.ModelRef) -> None:
    assert tracking.parse_model_ref(ref) == expected


@pytest.mark.parametrize(
    "ref", ["", "@champion", "enc@", "enc/", "enc/0", "enc/v2", "enc/1/model", "models://h/enc", "a:b"]
)
def test_parse_model_ref_rejects_bad_forms(ref: str) -> None:
    accepted = "Accepted forms: NAME, NAME@ALIAS, NAME/VERSION or NAME/latest"
    with pytest.raises(RegistryError, match=rf"bad model reference .*{accepted}"):
        tracking.parse_model_ref(ref)


def test_model_ref_uri_round_trips() -> None:
    for ref in ("enc@champion", "enc/3", "enc/latest"):
        parsed = tracking.parse_model_ref(ref)
        assert parsed.uri == f"models:/{ref}"
        assert tracking.parse_model_ref(parsed.uri) == parsed


# --------------------------------------------------------------------------- servers


def test_unreachable_server_fails_fast(project_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    with pytest.raises(TrackingError, match=rf"{uri}.*is the server running\? start it with `mlflow server"):
        with tracking.start_run("data", config={}):
            pytest.fail("the body must not run")
    with pytest.raises(TrackingError, match=uri):
        tracking.pull_model("enc", tmp_path / "x")
    assert time.monotonic() - started < 5


@pytest.fixture
def live_server(tmp_path: Path, mlflow_template_db: Path):
    """A real `mlflow server` on a free port (its store copied from the migrated template)."""
    db = tmp_path / "server.db"
    shutil.copyfile(mlflow_template_db, db)
    with mlflow_server(f"sqlite:///{db.as_posix()}", tmp_path) as uri:
        yield uri


@pytest.mark.slow
def test_live_server_run_register_pull(
    live_server: str, project_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", live_server)
    note = tmp_path / "note.txt"
    note.write_text("hello server")
    with tracking.start_run("pretrain", config={"lr": 0.001, "model": {"dim": 8}}, data_hash="abc") as run:
        run.log_metrics({"loss": 0.5}, step=1)
        run.log_artifact(note)
        state = _save_tiny_model(tmp_path / "m", seed=5)
        version = tracking.register_model_dir(run, tmp_path / "m", "enc-live", aliases=["champion"])
    assert version == 1

    client = _client(live_server)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params["model.dim"] == "8" and got.data.metrics["loss"] == 0.5
    assert got.data.tags["g2d.data_hash"] == "abc"
    assert got.info.artifact_uri.startswith("mlflow-artifacts:")  # the server chose, not us
    assert {f.path for f in client.list_artifacts(run.run_id)} >= {"config.yaml", "note.txt"}
    # the model is an MLflow model of the run (the UI's "Models" column), and the version points at it
    [output] = client.get_run(run.run_id).outputs.model_outputs
    assert client.get_model_version("enc-live", str(version)).source == f"models:/{output.model_id}"
    assert not (project_dir / "mlartifacts").exists()

    folder = tracking.pull_model("enc-live@champion", tmp_path / "pulled")
    _assert_same_tensors(folder, state)
    assert tracking.list_models()[0]["aliases"] == {"champion": 1}
    with pytest.raises(RegistryError, match="model 'enc-live' has no alias 'staging'; aliases: champion->1"):
        tracking.pull_model("enc-live@staging", tmp_path / "x")


def test_system_metrics_monitor_stops_with_the_run(mlflow_uri: str) -> None:
    with tracking.start_run("pretrain", config={}, system_metrics=True) as run:
        assert any(t.name == "SystemMetricsMonitor" for t in threading.enumerate())
    assert not any(t.name == "SystemMetricsMonitor" for t in threading.enumerate())
    assert _client(mlflow_uri).get_run(run.run_id).info.status == "FINISHED"


def test_a_repro_rewriting_its_outputs_does_not_dirty_the_tree(tmp_path):
    """Metrics committed with `cache: false` are rewritten (first deleted) by `dvc repro`: not a source change."""
    import subprocess

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "metrics" / "finetune" / "siim-seg" / "g2d").mkdir(parents=True)
    cell = tmp_path / "metrics" / "finetune" / "siim-seg" / "g2d" / "siim-seg_1.0_g2d_seed42.json"
    cell.write_text("{}")
    (tmp_path / "metrics" / "data.json").write_text("{}")
    (tmp_path / "params.yaml").write_text("seed: 42\n")
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  synth:\n    outs:\n    - path: metrics/data.json\n"
        "  finetune@siim-seg-g2d:\n    outs:\n    - path: metrics/finetune/siim-seg/g2d\n")
    git("init", "-q")
    git("-c", "user.email=t@t", "-c", "user.name=t", "add", "-A")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "x")
    assert runs._git_state(tmp_path)[1] is False
    cell.unlink()
    (tmp_path / "metrics" / "data.json").write_text('{"rows": 1}')
    (tmp_path / "dvc.lock").write_text((tmp_path / "dvc.lock").read_text() + "\n")
    assert runs._git_state(tmp_path)[1] is False
    (tmp_path / "params.yaml").write_text("seed: 43\n")
    assert runs._git_state(tmp_path)[1] is True
