"""Distributed fine-tuning: `g2d train` under torchrun with 2 ranks (gloo, CPU) trains like one process with
the same global batch, and rank 0 alone logs, writes and registers."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from g2d.config import load_params
from g2d.errors import ConfigError
from g2d.pipeline import distributed
from g2d.pipeline.finetune import stage as finetune
from tests.conftest import tiny_project_with_store, torchrun

SCRIPTS = Path(__file__).parent / "scripts"

# The whole U-Net trains (encoder unfrozen: its batch norms run over the global batch across the ranks), a
# fresh head that starts at half foreground, 3 epochs without early stopping, a global batch of 4 (2 rows per
# rank). MGCA's loss is not a mean over images: its soft Dice is taken over the batch, and under DDP over each
# rank's share (as PyTorch Lightning's DDP does in MGCA's code), so 2 ranks train close to, not exactly like, one
# process; the loop's exact equivalence on a per-row loss is the next test's.
RECIPE = ["finetune.segmentation.freeze_encoder=false", "finetune.segmentation.prior=0.5",
          "finetune.segmentation.batch_size=4", "finetune.segmentation.epochs=3", "finetune.segmentation.patience=3",
          "finetune.segmentation.augment.p=0"]


@pytest.fixture(scope="module")
def project(tmp_path_factory, mlflow_template_db) -> Path:
    """SynthCXR rendered at params.tiny.yaml, no pre-training (the runs start from a random init)."""
    return tiny_project_with_store(tmp_path_factory.mktemp("ddp-finetune") / "project", mlflow_template_db)


def _runs(uri: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.data.tags.get("g2d.task") == "siim-seg"]


def _curve(uri: str, run, key: str) -> list[float]:
    from mlflow import MlflowClient

    history = MlflowClient(tracking_uri=uri).get_metric_history(run.info.run_id, key)
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def test_two_ranks_fine_tune_like_one_process_with_the_same_global_batch(project, monkeypatch):
    uri = f"sqlite:///{project / 'mlflow.db'}"
    g2d = shutil.which("g2d") or str(Path(sys.executable).with_name("g2d"))
    sets = [a for s in RECIPE for a in ("--set", s)]
    done = torchrun("--no-python", g2d, "train", "--task", "siim-seg", "--frac", "1.0", "--init", "random", *sets,
                     cwd=project, env={"MLFLOW_TRACKING_URI": uri})
    assert done.stdout.count("registered g2d-siim-seg version 1") == 1  # rank 0 reports, rank 1 stays quiet
    path = project / "metrics" / "finetune" / "siim-seg" / "random" / "siim-seg_1.0_random_seed42.json"
    two = json.loads(path.read_text())

    monkeypatch.chdir(project)
    for var in ("MLFLOW_REGISTRY_URI", "DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    one = finetune.run(load_params(project / "params.yaml", RECIPE), task="siim-seg", frac=1.0, init="random").metrics

    # the same batches, epochs and steps
    assert (two["epochs"], two["steps"], two["stopped_early"]) == (one["epochs"], one["steps"], False) == \
        (3, one["steps"], False)
    runs = {r.data.tags["g2d.world_size"]: r for r in _runs(uri)}
    assert sorted(runs) == ["1", "2"]  # exactly one run from the 2-rank job, tagged with its world size
    # Close curves: the focal term is a per-pixel mean (exact over ranks), the soft-Dice term is per share. Measured
    # (2 cores, CPU): the train loss 10.7% and 12.5% apart in the first two epochs.
    for key in ("train/loss", "val/loss", "val/score"):
        a, b = _curve(uri, runs["2"], key), _curve(uri, runs["1"], key)
        assert len(a) == len(b) == 3, key
    assert _curve(uri, runs["2"], "train/loss") == pytest.approx(_curve(uri, runs["1"], "train/loss"), rel=0.25)
    assert two["score"] == pytest.approx(one["score"], abs=0.1)

    from mlflow import MlflowClient

    versions = MlflowClient(tracking_uri=uri).search_model_versions("name='g2d-siim-seg'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert [v.run_id for v in versions if v.run_id == runs["2"].info.run_id] == [runs["2"].info.run_id]


def test_uneven_shares_of_a_small_train_set_train_like_one_process(tmp_path):
    """The loop alone (tests/scripts/ddp_fit.py): 5 rows, a batch of 8 (the train set is the batch), shares of 3
    and 2 rows weighted 6/5 and 4/5, a batch norm over the global batch, early stopping on rank 0. Measured:
    weights within 1.5e-7 relative, losses within 8e-8; without the weights the losses differ by 0.28."""
    done = torchrun(str(SCRIPTS / "ddp_fit.py"), cwd=tmp_path, env={})
    lines = [line.split() for line in done.stdout.splitlines() if line.startswith("rank")]
    assert sorted(int(x[1]) for x in lines) == [0, 1]
    for x in lines:
        rank, steps, best, stopped = int(x[1]), x[3:5], x[6:8], x[9:11]
        assert steps[0] == steps[1] and stopped == ["True", "True"]  # every rank stopped where one process did
        assert float(x[14]) < 1e-5  # the logged loss: the global batch's
        if rank == 0:  # rank 0 restored the best weights the one process restored
            assert best[0] == best[1] and float(x[12]) < 1e-5


@pytest.mark.parametrize(("task", "key", "size"), [("siim-seg", "finetune.segmentation.batch_size", 4),
                                                   ("chexpert-cls", "finetune.probe.batch_size", 32),
                                                   ("rsna-det", "finetune.detection.batch_size", 4)])
def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused(project, monkeypatch, task, key, size):
    """Before any data is loaded or a run opened: rank 0 of 3 (no process group is needed to refuse)."""
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'refused.db'}")
    monkeypatch.setattr(distributed, "from_environment", lambda: distributed.Context(rank=0, world=3))
    with pytest.raises(ConfigError, match=rf"{key} = {size} does not split over 3 processes; use a multiple of 3"):
        finetune.run(load_params(project / "params.yaml"), task=task, frac=1.0, init="random")
    assert not (project / "refused.db").exists()


def test_a_train_set_smaller_than_the_world_is_refused(project, monkeypatch):
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'refused.db'}")
    monkeypatch.setattr(distributed, "from_environment", lambda: distributed.Context(rank=0, world=32))
    params = load_params(project / "params.yaml", ["finetune.segmentation.batch_size=32",
                                                   "finetune.segmentation.balanced=[]"])
    with pytest.raises(ConfigError, match=r"siim-seg: 16 train image\(s\) cannot be shared by 32 processes"):
        finetune.run(params, task="siim-seg", frac=1.0, init="random")
    assert not (project / "refused.db").exists()
