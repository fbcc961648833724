"""End to end, as a user on a fresh clone: fetch the embedded sources, `dvc repro` with the tiny
params, then check the rendered data, the DVC state and the MLflow run."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def sh(*cmd: str, cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> tuple[Path, dict]:
    """A git repository holding the working tree's project files (committed or not), as a
    fresh clone would, without data, stores or outputs."""
    repo = tmp_path_factory.mktemp("e2e") / "g2d"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        if rel.startswith("metrics/") and not rel.endswith(".gitkeep"):
            continue  # the default run's committed metrics, not outputs of the tiny params
        if (ROOT / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, repo / rel)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    shutil.copy(repo / "params.tiny.yaml", repo / "params.yaml")
    sh("git", "init", "-q", cwd=repo, env=env)
    sh("git", "add", "-A", cwd=repo, env=env)
    sh("git", "commit", "-qm", "clone with the tiny params", cwd=repo, env=env)
    return repo, env


def test_fetch_then_dvc_status_sees_data_unchanged(clone):
    repo, env = clone
    sh("g2d", "data", "fetch", cwd=repo, env=env)
    assert "up to date" in sh("dvc", "status", "data.dvc", cwd=repo, env=env)
    # a stray file in data/ is named, never silently committed into data.dvc
    (repo / "data" / "stray.txt").write_text("x")
    proc = subprocess.run(["g2d", "data", "fetch"], cwd=repo, env=env, capture_output=True, text=True)
    (repo / "data" / "stray.txt").unlink()
    assert proc.returncode == 1
    assert "data.dvc: the fetched folder differs from what it records" in proc.stderr


def test_dvc_repro_renders_tracks_and_ends_clean(clone, monkeypatch):
    repo, env = clone
    sh("dvc", "repro", cwd=repo, env=env)
    assert "up to date" in sh("dvc", "status", cwd=repo, env=env)

    out = repo / "datasets" / "synthcxr"
    metrics = json.loads((repo / "metrics" / "data.json").read_text())
    assert metrics["sets"]["pretrain"]["rows"] == 48
    assert metrics["sets"]["pneumothorax"]["rows"] == metrics["sets"]["opacity"]["rows"] == 24
    assert (out / "contact_sheet.png").stat().st_size > 10_000
    assert (out / "params.yaml").is_file()
    sh("g2d", "data", "validate", str(out / "pretrain"), cwd=repo, env=env)

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    [exp] = [e for e in client.search_experiments() if e.name == "g2d-data"]
    [run] = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "synth"  # named after the DVC stage
    assert run.data.tags["g2d.dvc_stage"] == "synth"
    assert run.data.tags["g2d.git_dirty"] == "false"  # DVC removing its outputs does not dirty the tree
    assert run.data.tags["g2d.data_hash"] == metrics["data_hash"]
    assert run.data.params["synth.image_size"] == "64"
    names = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert {"synthcxr-pretrain", "synthcxr-pneumothorax", "synthcxr-opacity", "NLMCXR_reports.tgz"} <= set(names)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert "figures/contact_sheet.png" in artifacts

    # pretrain: tracked, and its model registered; `models:/g2d-encoder/latest` resolves to it
    pretrain = json.loads((repo / "metrics" / "pretrain.json").read_text())
    assert pretrain["steps"] > 0 and pretrain["data_hash"] == metrics["sets"]["pretrain"]["sha256"]
    [exp] = [e for e in client.search_experiments() if e.name == "g2d-pretrain"]
    runs = {r.data.tags["g2d.dvc_stage"]: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"pretrain", "pretrain-global", "ablation@g2d", "ablation@shuffled-masks",
                         "ablation-seed@g2d-43", "ablation-seed@shuffled-masks-43"}
    for stage, name in (("pretrain", "g2d-encoder"), ("pretrain-global", "g2d-encoder-global")):
        [version] = client.search_model_versions(f"name='{name}'")
        assert runs[stage].info.status == "FINISHED" and version.run_id == runs[stage].info.run_id
    assert runs["pretrain-global"].data.params["pretrain.dense"] == "none"
    pulled = sh("g2d", "models", "pull", "g2d-encoder/latest", "--out", str(repo / "pulled"), cwd=repo, env=env)
    assert (repo / "pulled" / "model" / "MLmodel").is_file(), pulled  # an MLflow model, g2d's files inside
    assert (repo / "pulled" / "model" / "artifacts" / "g2d_model" / "model.safetensors").is_file(), pulled

    # finetune: the tiny matrix (2 tasks x 1 fraction x 3 inits x 1 seed), each cell a metrics file and a version
    cells = sorted(p.name for p in (repo / "metrics" / "finetune").rglob("*.json"))
    assert cells == sorted(f"{t}_1.0_{i}_seed42.json" for t in ("siim-seg", "chexpert-cls")
                           for i in ("g2d", "global", "random"))
    assert len(client.search_model_versions("name='g2d-chexpert-cls'")) == 3
    # siim-seg: the matrix (3); the study's runs register apart, one name per variant
    assert len(client.search_model_versions("name='g2d-siim-seg'")) == 3
    for variant in ("encoder-decoder", "g2d", "shuffled-masks"):
        assert len(client.search_model_versions(f"name='g2d-siim-seg-{variant}'")) == 1
    [exp] = [e for e in client.search_experiments() if e.name == "g2d-finetune"]
    finetunes = client.search_runs([exp.experiment_id])
    assert len(finetunes) == 9 and all(r.info.status == "FINISHED" for r in finetunes)
    some = next(r for r in finetunes if r.data.tags["g2d.dvc_stage"] == "finetune@siim-seg-g2d")
    assert {a.path for a in client.list_artifacts(some.info.run_id, "figures")} == {
        "figures/siim-seg_1.0_g2d_seed42_test.png"}
    per_image = json.loads((repo / "metrics" / "finetune" / "siim-seg" / "g2d" / "siim-seg_1.0_g2d_seed42.json"
                            ).read_text())["per_image"]
    assert len(per_image["ids"]) == len(per_image["dice"]) > 0
    # the study: each ablation pre-trained on the budget and registered, fine-tuned per seed; the report's tables
    for variant in ("g2d", "shuffled-masks"):
        ablation = json.loads((repo / "metrics" / "ablations" / f"{variant}.json").read_text())
        assert ablation["steps"] == 2
        assert client.search_model_versions(f"name='g2d-ablation-{variant}'")
    assert sorted(p.name for p in (repo / "metrics" / "study").rglob("*.json")) == [
        f"siim-seg_1.0_{v}_seed42.json" for v in ("encoder-decoder", "g2d", "shuffled-masks")]
    studied = (repo / "reports" / "study.md").read_text()
    for title in ("## Table 1", "## Table 4", "## Table 1, last rows: encoder-only", "## Tables 5b, 5d, 5f and 8",
                  "## Which of the paper's orderings hold"):
        assert title in studied, title
    assert "(n = 1, no interval)" in studied  # one seed: each cell says so rather than inventing an interval
    assert (repo / "reports" / "study" / "ablations.png").stat().st_size > 10_000
    # grounding: every ablation, the grounding pair again with seed 43, compared over both seeds and the phrases
    assert json.loads((repo / "metrics" / "ablations" / "grounding" / "synthcxr_g2d-seed43.json").read_text()
                      )["model_seed"] == 43
    assert "| shuffled-masks | 42, 43 |" in studied
    assert "g2d - shuffled-masks, pointing game x 100:" in studied and "paired over 2 pre-training seeds x" in studied
    assert client.search_model_versions("name='g2d-ablation-g2d-seed43'")
    # promote: the rule in params gives g2d-encoder's only version the alias champion, and writes its card
    assert int(client.get_model_version_by_alias("g2d-encoder", "champion").version) == 1
    card = (repo / "reports" / "model_card.md").read_text()
    assert card.startswith("# g2d-encoder@champion: version 1") and "## Intended use and limits" in card
    assert client.get_model_version("g2d-encoder", "1").description == card
    # MLflow's way (the UI and mlflow.pyfunc): experiments tagged as model training; every fine-tuning run lists
    # its model and logs its headline as test/score; the champion and a fine-tuned model load and predict
    assert all(e.tags.get("mlflow.experimentKind") == "custom_model_development"
               for e in client.search_experiments() if e.name.startswith("g2d-"))
    assert all(r.outputs.model_outputs for r in finetunes)
    assert {r.data.tags["g2d.metric"] for r in finetunes} == {"dice", "auc"}
    assert all(r.data.metrics["test/score"] == r.data.metrics[f"test/{r.data.tags['g2d.metric']}"] for r in finetunes)
    import mlflow
    import pandas as pd

    png = io.BytesIO()
    Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))).save(png, format="PNG")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow.db'}")
    [answer] = mlflow.pyfunc.load_model("models:/g2d-encoder@champion").predict(
        pd.DataFrame({"image": [png.getvalue()], "prompts": [["effusion", "no effusion"]]}))
    assert len(answer["scores"]) == 2 and np.asarray(answer["heatmaps"]).shape == (2, 64, 64)
    [seg] = mlflow.pyfunc.load_model("models:/g2d-siim-seg/latest").predict(pd.DataFrame({"image": [png.getvalue()]}))
    assert np.asarray(seg["mask"]).shape == (64, 64)
    # each training stage checked its data against what DVC recorded for the synth stage before its first step
    for run in (some, runs["pretrain"]):
        text = Path(client.download_artifacts(run.info.run_id, "preflight.txt", tempfile.mkdtemp())).read_text()
        assert "matches dvc.lock (stage synth) for datasets/synthcxr" in text, text
    # report: the tables, the curves, and DVC sees the metrics
    results = (repo / "reports" / "results.md").read_text()
    assert "## Table 1" in results and "## Table 4" in results and "| G2D |" in results
    assert (repo / "reports" / "learning_curves.png").stat().st_size > 10_000
    shown = sh("dvc", "metrics", "show", "--json", cwd=repo, env=env)
    assert "metrics/finetune/chexpert-cls/global/chexpert-cls_1.0_global_seed42.json" in shown
    # zeroshot and ground: the encoders of matrix.encoders (tiny: G2D's) beside chance in the report (Table 2)
    for folder in ("zeroshot", "grounding"):
        m = json.loads((repo / "metrics" / folder / "synthcxr_g2d.json").read_text())
        assert m["model_source"] == "models/pretrain"
    assert "## Table 2a" in results and "## Table 2b" in results and "| Chance |" in results
    assert (repo / "reports" / "grounding" / "synthcxr_g2d.png").stat().st_size > 10_000
    assert "metrics/grounding/synthcxr_g2d.json" in shown


def test_notebook_runs_on_the_rendered_data(clone):
    import nbformat
    from nbclient import NotebookClient

    repo, env = clone
    if not (repo / "datasets" / "synthcxr" / "synthcxr.json").is_file():
        sh("dvc", "repro", cwd=repo, env=env)
    nb = nbformat.read(repo / "notebooks" / "synthcxr.ipynb", as_version=4)
    old = os.getcwd()
    try:
        os.chdir(repo)
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(repo)}}).execute()
    finally:
        os.chdir(old)
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "pretrain      rows    48" in printed
    assert "synthcxr-pretrain" in printed


def test_quickstart_notebook_runs(clone):
    """notebooks/quickstart.ipynb: the registered encoder, pseudo masks, zero-shot scores, a heat map."""
    import nbformat
    from nbclient import NotebookClient

    repo, env = clone
    if not (repo / "models" / "pretrain").is_dir():
        sh("dvc", "repro", cwd=repo, env=env)
    nb = nbformat.read(repo / "notebooks" / "quickstart.ipynb", as_version=4)
    old = os.getcwd()
    try:
        os.chdir(repo / "notebooks")  # where Jupyter starts a notebook's kernel
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(repo / "notebooks")}}).execute()
    finally:
        os.chdir(old)
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "models:/g2d-encoder/1: resnet18 image tower" in printed
    assert "synthcxr_g2d.json: auc" in printed and "maximum inside the box" in printed
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert images == 2  # the pseudo-mask grid and the heat map


def test_train_and_evaluate_after_repro(clone):
    """`g2d train --frac 0.01` on its own, then `g2d evaluate` of what it registered."""
    repo, env = clone
    if not (repo / "models" / "pretrain").is_dir():
        sh("dvc", "repro", cwd=repo, env=env)
    out = sh("g2d", "train", "--frac", "0.01", cwd=repo, env=env)
    assert "siim-seg 1% labels" in out and "init g2d" in out and "registered g2d-siim-seg version" in out
    m = json.loads((repo / "metrics" / "finetune" / "siim-seg" / "g2d" / "siim-seg_0.01_g2d_seed42.json").read_text())
    shown = sh("g2d", "evaluate", "--task", "siim-seg", "--model", "models:/g2d-siim-seg/latest", cwd=repo, env=env)
    assert f"dice {m['score']:.4f}" in shown
