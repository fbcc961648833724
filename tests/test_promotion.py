"""`g2d models promote` by the rule in params.promote: versions compete by the fine-tuning runs of their
weights in the store; the winner gets the alias and a model card generated from its registry entry."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from g2d import tracking
from g2d.config import load_params
from g2d.errors import RegistryError
from g2d.pipeline.study import promotion
from g2d.tracking import store

ROOT = Path(__file__).resolve().parents[1]


def _register(tmp: Path, weights: bytes) -> tuple[int, str]:
    folder = tmp / hashlib.sha256(weights).hexdigest()[:8]
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": {"encoder": "resnet18", "heads": 4}, "dense":
                                                        "pseudo_seg", "data_hash": "d" * 64, "split_hash": "s" * 64}))
    (folder / "params.yaml").write_text("pretrain:\n  epochs: 3\n")
    with tracking.start_run("pretrain", config={}) as run:
        version = tracking.register_model_dir(run, folder, "g2d-encoder")
    return version, hashlib.sha256(weights).hexdigest()


def _finetune(sha: str, seed: int, val: float, test: float, frac: str = "0.01", **extra: str) -> None:
    tags = {"g2d.task": "siim-seg", "g2d.frac": frac, "g2d.init_sha256": sha, "g2d.seed": str(seed), **extra}
    with tracking.start_run("finetune", config={}, tags=tags) as run:
        run.log_metrics({"val_best": val, "test/dice": test})


def test_the_best_mean_over_seeds_wins_and_gets_a_card(mlflow_uri, project_dir, tmp_path):
    params = load_params(ROOT / "params.yaml", ["study.resamples=199"])
    v1, sha1 = _register(tmp_path, b"one")
    v2, sha2 = _register(tmp_path, b"two")
    v3, sha3 = _register(tmp_path, b"three")
    for seed, (a, b) in zip((42, 43, 44), ((0.30, 0.40), (0.32, 0.41), (0.31, 0.39)), strict=True):
        _finetune(sha1, seed, a, a)
        _finetune(sha2, seed, b, b)
    _finetune(sha2, 42, 0.99, 0.99, **{"g2d.variant": "encoder-decoder"})  # another protocol: not counted
    _finetune(sha2, 42, 0.99, 0.99, frac="0.1")  # another fraction: not counted, but in the card
    _finetune(sha3, 42, 0.95, 0.95)  # one seed only: does not compete (min_seeds 3)
    out = promotion.run(params)
    assert (out.version, out.alias) == (v2, "champion")
    assert {c.version.version for c in out.candidates} == {v1, v2}
    assert tracking.resolve_model("g2d-encoder@champion").version == v2
    card = out.card.read_text()
    assert card.startswith(f"# g2d-encoder@champion: version {v2}")
    assert sha2 in card and "d" * 64 in card and "s" * 64 in card and "epochs: 3" in card
    assert "| siim-seg | 1% | dice 40.0 ± 1.0 [" in card  # the test scores of its three seeds, with an interval
    assert "| siim-seg | 10% | dice 99.0 (n = 1, no interval) | 42 |" in card
    assert store._client(mlflow_uri).get_model_version("g2d-encoder", str(v2)).description == card


def test_a_rerun_of_a_seed_replaces_the_older_run(mlflow_uri, project_dir, tmp_path):
    params = load_params(ROOT / "params.yaml", ["promote.min_seeds=1"])
    v1, sha1 = _register(tmp_path, b"one")
    _finetune(sha1, 42, 0.10, 0.10)
    _finetune(sha1, 42, 0.20, 0.20)
    [c] = promotion.run(params).candidates
    assert c.scores == {42: pytest.approx(0.20)}


def test_no_version_with_enough_seeds_is_an_error_naming_the_rule(mlflow_uri, project_dir, tmp_path):
    params = load_params(ROOT / "params.yaml")
    v1, sha1 = _register(tmp_path, b"one")
    _finetune(sha1, 42, 0.3, 0.3)
    with pytest.raises(RegistryError, match=r"no version of 'g2d-encoder' has 3 seeds of `g2d train --task siim-seg "
                       r"--frac 0.01 --init <its weights>` in the store \(v1: 1 seed\(s\)\)"):
        promotion.run(params)


def test_promote_cli_without_arguments_uses_the_rule(mlflow_uri, project_dir, tmp_path):
    from typer.testing import CliRunner

    from g2d.cli import app

    (project_dir / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    v1, sha1 = _register(tmp_path, b"one")
    for seed in (42, 43, 44):
        _finetune(sha1, seed, 0.3, 0.3)
    result = CliRunner().invoke(app, ["models", "promote"])
    assert result.exit_code == 0, result.output
    assert "g2d-encoder@champion -> version 1; model card" in result.output
    bad = CliRunner().invoke(app, ["models", "promote", "g2d-encoder"])
    assert bad.exit_code == 1 and "sets an alias by hand" in bad.output
