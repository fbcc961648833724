"""The pretrain stage on a tiny SynthCXR: it trains, tracks, registers, reloads and resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from g2d import tracking
from g2d.config import load_params
from g2d.pipeline import model_files
from g2d.pipeline.pretrain import stage as pretrain
from g2d.tracking import store
from tests.conftest import tiny_synthcxr_project

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory) -> Path:
    """A project folder with params.tiny.yaml as params.yaml and its SynthCXR rendered."""
    root = tmp_path_factory.mktemp("pretrain") / "project"
    tiny_synthcxr_project(root)
    return root


@pytest.fixture
def project(tiny_project, mlflow_template_db, monkeypatch) -> Path:
    for var in ("DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(var, raising=False)
    shutil.rmtree(tiny_project / "models", ignore_errors=True)
    db = tiny_project / "mlflow.db"
    shutil.copyfile(mlflow_template_db, db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.chdir(tiny_project)
    return tiny_project


def params(root: Path, *overrides: str):
    return load_params(root / "params.yaml", list(overrides))


def test_pretrain_trains_tracks_and_registers(project):
    outcome = pretrain.run(params(project))
    m = json.loads((project / "metrics" / "pretrain.json").read_text())
    assert m["steps"] == outcome.metrics["steps"] > 0
    assert set(m["retrieval"]) == {f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    q = m["pseudo_mask"]
    assert q["images"] > 0 and q["by_kind"]
    for name in ("coverage", "precision", "iou", "pointing"):
        assert 0 <= q[name] <= 1 and 0 < q[f"{name}_chance"] <= 1
    assert len(m["pseudo_mask_by_epoch"]) >= 1 and m["pseudo_mask_by_epoch"][-1]["step"] == m["steps"]
    assert outcome.version == 1
    card = (outcome.model_dir / "model_card.md").read_text()
    assert m["data_hash"] in card and "Intended use and limits" in card

    run = store._client(tracking.tracking_uri()).get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    # MLflow metric names cannot hold "@": R@1 is logged as R_1
    assert {"loss/total", "loss/global", "loss/dense", "lr", "pairs_per_s", "val/i2t_R_1",
            "val/pseudo_mask/coverage", "val/pseudo_mask/pointing_chance"} <= set(run.data.metrics)
    assert run.data.tags["g2d.data_hash"] == m["data_hash"] and run.data.tags["g2d.split_hash"] == m["split_hash"]
    [output] = run.outputs.model_outputs  # the registered model shows the final retrieval on its own page
    linked = store._client(tracking.tracking_uri()).get_logged_model(output.model_id).metrics
    assert {x.key: x.value for x in linked}["val/i2t_R_1"] == pytest.approx(m["retrieval"]["i2t_R@1"])
    figures = [a.path for a in store._client(tracking.tracking_uri()).list_artifacts(outcome.run_id, "figures")]
    assert any(f.endswith(".png") for f in figures)


def test_registered_model_loads_back_with_identical_outputs(project, tmp_path):
    outcome = pretrain.run(params(project, "pretrain.max_steps=2"))
    local, _, _ = model_files.load(outcome.model_dir)
    pulled_dir = tracking.pull_model("g2d-encoder/latest", tmp_path / "pulled")
    pulled, tokenizer, config = model_files.load(pulled_dir)
    images = torch.rand(3, 1, config["image_size"], config["image_size"])
    tokens = tokenizer(["a", "left effusion", "normal chest"], padding="longest", return_tensors="pt")
    with torch.no_grad():
        a, b = local.encode_image(images), pulled.encode_image(images)
        assert torch.equal(a.embedding, b.embedding) and torch.equal(a.attention, b.attention)
        assert torch.equal(local.encode_text(tokens["input_ids"], tokens["attention_mask"]),
                           pulled.encode_text(tokens["input_ids"], tokens["attention_mask"]))
        assert torch.equal(local.decode(a.features), pulled.decode(b.features))


def test_resume_after_a_crash_ends_with_the_same_weights(project, monkeypatch):
    cfg = params(project, "pretrain.max_steps=4", "pretrain.checkpoint_every=2")
    pretrain.run(cfg)
    reference = load_file(project / "models" / "pretrain" / "model.safetensors")
    shutil.rmtree(project / "models")

    real_clip, calls = torch.nn.utils.clip_grad_norm_, {"n": 0}

    def crash_on_third_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", crash_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        pretrain.run(cfg)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", real_clip)
    outcome = pretrain.run(cfg, resume=True)
    resumed = load_file(outcome.model_dir / "model.safetensors")
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    runs = store._client(tracking.tracking_uri()).search_runs(
        [store._client(tracking.tracking_uri()).get_experiment_by_name("g2d-pretrain").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED", "KILLED"]


def test_resume_refuses_a_checkpoint_of_another_run(project):
    pretrain.run(params(project, "pretrain.max_steps=2", "pretrain.checkpoint_every=1"))
    with pytest.raises(pretrain.runtime.CheckpointError, match=r"written by a different run \(seed 42 != 7\)"):
        pretrain.run(params(project, "pretrain.max_steps=2", "pretrain.checkpoint_every=1", "seed=7"), resume=True)


def test_resume_refuses_a_corrupt_or_foreign_checkpoint(project):
    ckpt = project / "models" / "pretrain-checkpoints" / "checkpoint.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"\x00garbage")
    with pytest.raises(pretrain.runtime.CheckpointError, match=r"checkpoint.pt: not a readable g2d checkpoint"):
        pretrain.run(params(project), resume=True)
    ckpt.unlink()
    with pytest.raises(pretrain.runtime.CheckpointError, match=r"no checkpoint to resume from"):
        pretrain.run(params(project), resume=True)
