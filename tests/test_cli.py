"""The CLI surface: one-line errors, --debug, --version, and the models commands end to end."""

import json

import pytest
import torch
from typer.testing import CliRunner

from g2d import __version__, cli, tracking
from g2d.cli import app
from g2d.errors import DataError
from tests.test_tracking import _assert_same_tensors, _save_tiny_model

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"g2d {__version__}"


def test_config_error_is_one_line_and_debug_shows_traceback(project_dir):
    (project_dir / "params.yaml").write_text("synth:\n  imge_size: 64\n")
    result = runner.invoke(app, ["data", "fetch"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("g2d: error: params.yaml: unknown key 'synth.imge_size'")
    debug = runner.invoke(app, ["--debug", "data", "fetch"])
    assert debug.exit_code != 0 and type(debug.exception).__name__ == "ConfigError"


def test_bad_set_override_is_one_line(project_dir):
    (project_dir / "params.yaml").write_text("")
    result = runner.invoke(app, ["data", "fetch", "--set", "synth.image_size=abc"])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1
    assert "synth.image_size = 'abc' is invalid" in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["pretrain", "--seed", "43"], "--seed needs --variant (a study ablation's rerun); for the main pre-training use "
                                   "--set seed=N"),
    (["pretrain", "--variant", "nope"], "--variant 'nope' is not a name in study.ablations"),
])
def test_pretrain_variant_and_seed_mistakes_are_one_line(project_dir, args, message):
    (project_dir / "params.yaml").write_text("")
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert message in result.output


@pytest.fixture
def registered(mlflow_uri, tmp_path):
    with tracking.start_run("pretrain", config={"model": "tiny"}) as run:
        state = _save_tiny_model(tmp_path / "m1", seed=1)
        tracking.register_model_dir(run, tmp_path / "m1", "g2d-encoder")
    return state


def test_models_list_promote_pull_round_trip(registered, tmp_path):
    listed = runner.invoke(app, ["models", "list"])
    assert listed.exit_code == 0 and "g2d-encoder  versions [1]  no aliases" in listed.output
    promoted = runner.invoke(app, ["models", "promote", "g2d-encoder", "1", "--alias", "champion"])
    assert promoted.exit_code == 0, promoted.output
    for ref in ("g2d-encoder@champion", "g2d-encoder/1", "g2d-encoder/latest"):
        out = tmp_path / ref.replace("/", "_")
        result = runner.invoke(app, ["models", "pull", ref, "--out", str(out)])
        assert result.exit_code == 0, result.output
        # g2d's files inside the MLflow model, which `mlflow.pyfunc.load_model` takes whole
        files = out / "model" / "artifacts" / "g2d_model"
        assert result.output.strip().endswith(f"{files}\nMLflow model (mlflow.pyfunc.load_model): {out / 'model'}")
        assert (out / "model" / "MLmodel").is_file()
        _assert_same_tensors(files, registered)
        assert json.loads((files / "model_card.json").read_text())["seed"] == 1


def test_missing_alias_is_one_line(registered, tmp_path):
    result = runner.invoke(app, ["models", "pull", "g2d-encoder@nope", "--out", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert result.output.startswith("g2d: error: ") and "no alias 'nope'" in result.output
    latest = runner.invoke(app, ["models", "promote", "g2d-encoder", "1", "--alias", "latest"])
    assert latest.exit_code == 1 and "reserved" in latest.output


def test_read_only_commands_do_not_create_a_store(project_dir, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 1 and "no MLflow store at" in result.output
    assert not (project_dir / "mlflow.db").exists()


def test_pull_refuses_a_folder_with_files(registered, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "old.txt").write_text("stale")
    result = runner.invoke(app, ["models", "pull", "g2d-encoder/1", "--out", str(out)])
    assert result.exit_code == 1 and "not empty; pull into a new or empty folder" in result.output


class _BadImages(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        raise DataError(f"image /data/x{i}.png is corrupt or not an image; re-copy it")


def test_an_error_raised_in_a_dataloader_worker_is_still_one_line():
    with pytest.raises(DataError) as e:
        next(iter(torch.utils.data.DataLoader(_BadImages(), num_workers=1)))
    assert "Original Traceback" in str(e.value)  # how torch hands it back
    assert cli.message(e.value) == "image /data/x0.png is corrupt or not an image; re-copy it"
