"""`g2d bench` on tiny networks: every figure it promises is measured and printed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from g2d.cli import app
from g2d.config import Params, load_params
from g2d.pipeline.pretrain import bench
from tests.conftest import tiny_synthcxr_project

runner = CliRunner()


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench") / "project"
    tiny_synthcxr_project(root)
    return root


def test_bench_prints_the_ratios_rates_flops_and_memory(rendered, monkeypatch):
    monkeypatch.chdir(rendered)
    result = runner.invoke(app, ["bench", "--model", "params", "--batch", "4", "--steps", "1", "--rounds", "2",
                                 "--image-size", "64", "--workers", "0", "--loader-batches", "2",
                                 "--json", "bench.json"])
    assert result.exit_code == 0, result.output
    for line in ("(a) g2d vs authors' training:", "(b) G2D step vs global-only step:", "(c) dataloader:",
                 "(d) peak memory"):
        assert line in result.output
    figures = json.loads((rendered / "bench.json").read_text())
    assert set(figures["variants"]) == {"g2d", "global", "authors"}
    for v in figures["variants"].values():
        assert v["pairs_per_s"] > 0 and v["steps_timed"] == 2 and v["gflops_per_pair"] > 0
    # the authors' way does more work per pair: reports padded to 256 tokens, backward through frozen layers
    assert figures["variants"]["authors"]["gflops_per_pair"] > figures["variants"]["g2d"]["gflops_per_pair"]
    # and keeps more activations: the frozen layers' (CPU: bytes saved for the backward pass)
    assert figures["variants"]["authors"]["peak_memory_mb"] > figures["variants"]["g2d"]["peak_memory_mb"] > 0
    # the dense task adds the decoder's work to the global step
    assert figures["variants"]["g2d"]["gflops_per_pair"] > figures["variants"]["global"]["gflops_per_pair"]
    assert figures["mean_padded_tokens"] < 256 and figures["loader_images_per_s"] > 0


def test_frozen_text_layers_record_no_graph_unless_tracked_like_the_authors(rendered):
    """Ours: the frozen layers' output has no autograd history (they run as under no_grad). The authors'
    way keeps it, so the backward pass runs through them."""

    from g2d.model.towers import TextTower, load_tokenizer

    cfg = load_params(rendered / "params.yaml").model
    tokenizer = load_tokenizer(cfg)
    tower = TextTower(cfg, tokenizer.vocab_size).train()
    tokens = tokenizer(["no acute cardiopulmonary process"], return_tensors="pt")
    seen = {}
    tower.bert.encoder.layer[cfg.text_frozen_layers - 1].register_forward_hook(
        lambda m, a, out: seen.update(frozen=(out[0] if isinstance(out, tuple) else out)))
    tower(tokens["input_ids"], tokens["attention_mask"])
    assert seen["frozen"].grad_fn is None and not seen["frozen"].requires_grad
    tower.track_frozen = True
    tower(tokens["input_ids"], tokens["attention_mask"])
    assert seen["frozen"].grad_fn is not None
    assert all(not p.requires_grad for p in tower.bert.embeddings.parameters())  # the same parameters train


def test_bench_needs_pre_training_pairs(project_dir):
    with pytest.raises(Exception, match=r"no pre-training pairs to benchmark on; render them first"):
        bench.run(Params(), batch=2, steps=1, rounds=1, image_size=64, workers=0, loader_batches=1)
