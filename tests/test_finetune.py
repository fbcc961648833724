"""Fine-tuning on a tiny SynthCXR: every task family end to end, the frozen protocol, registration,
evaluation, the report, and every bad input of the issue with its message."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from g2d import tracking
from g2d.cli import app
from g2d.config import load_params
from g2d.data import labelled, tasks
from g2d.data import manifest as mf
from g2d.errors import ConfigError, DataError
from g2d.pipeline import runtime
from g2d.pipeline.finetune import fit as loop
from g2d.pipeline.finetune import initialisation
from g2d.pipeline.finetune import stage as finetune
from g2d.pipeline.study import report

ROOT = Path(__file__).resolve().parents[1]


def params(root: Path, *overrides: str):
    return load_params(root / "params.yaml", list(overrides))


def registered(root: Path) -> dict[str, list[int]]:
    return {m["name"]: m["versions"] for m in tracking.list_models()}


def runs(root: Path) -> int:
    import os

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    return sum(len(client.search_runs([e.experiment_id])) for e in client.search_experiments())


# ---------------------------------------------------------------- metrics on hand-made inputs


def test_dice_per_image_follows_the_siim_convention():
    from g2d.pipeline.downstream_metrics import dice_per_image, segmentation_scores

    truth = torch.zeros(4, 1, 4, 4, dtype=torch.bool)
    pred = torch.zeros_like(truth)
    pred[1, 0, 0, 0] = True  # 1: empty truth, a false positive pixel -> 0
    truth[2, 0, 0, :2] = True  # 2: a finding the prediction misses -> 0
    truth[3, 0, 0, :2] = True  # 3: truth 2 px, prediction 1 of them + 1 outside -> 2*1 / (2+2)
    pred[3, 0, 0, 1:3] = True
    assert dice_per_image(pred, truth).tolist() == [1.0, 0.0, 0.0, 0.5]  # 0: empty and empty -> 1
    probs = pred.float() * 0.9
    scores = segmentation_scores(probs, truth, threshold=0.5)
    assert scores["dice"] == pytest.approx(1.5 / 4)
    assert scores["dice_positive"] == pytest.approx(0.25) and scores["empty_correct"] == pytest.approx(0.5)


def test_map_over_iou_040_to_075():
    from g2d.pipeline.downstream_metrics import mean_ap

    truth, labels = [torch.tensor([[0.0, 0.0, 10.0, 10.0]])], [torch.tensor([1])]

    def pred(x1: float) -> list[dict]:
        return [{"boxes": torch.tensor([[0.0, 0.0, x1, 10.0]]), "labels": torch.tensor([1]),
                 "scores": torch.tensor([0.9])}]

    assert mean_ap(pred(10.0), truth, labels, ("opacity",), 5)["map"] == pytest.approx(1.0)
    # IoU 6.2 / 10 = 0.62 is a hit at 0.40, 0.45, 0.50, 0.55, 0.60 and a miss at 0.65, 0.70, 0.75
    out = mean_ap(pred(6.2), truth, labels, ("opacity",), 5)
    assert out["map"] == pytest.approx(5 / 8) and out["ap50"] == pytest.approx(1.0)


def test_macro_auc_counts_undefined_classes():
    from g2d.pipeline.downstream_metrics import auc_scores

    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0], [float("nan"), 0.0]])
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.5], [0.0, 0.3]])
    out = auc_scores(scores, labels, ("a", "b"))
    assert out["auc"] == 1.0 and out["auc_classes"] == 1 and out["auc_classes_undefined"] == 1


# ---------------------------------------------------------------- label fractions


def test_fractions_are_recorded_or_nested(tiny_project):
    folder = tiny_project / "datasets" / "synthcxr" / "pneumothorax"
    df = mf.read_manifest(folder)
    train = set(df.loc[df["split"] == "train", "id"])
    whole = labelled.fraction(folder, df, 1.0)
    assert set(whole.ids) == train and whole.source == "fractions/train_1.txt"
    tenth = labelled.fraction(folder, df, 0.1)
    half = labelled.fraction(folder, df, 0.5)
    assert set(tenth.ids) <= set(half.ids) <= train and len(half.ids) == len(train) // 2
    assert "nested ranking" in half.source and half.sha256 != whole.sha256
    with pytest.raises(DataError, match=r"--frac 0.001: .* empty subset; the smallest usable fraction is"):
        labelled.fraction(folder, df, 0.001)


def test_edited_fraction_file_is_refused(tmp_path, tiny_project):
    folder = tmp_path / "pneumothorax"
    shutil.copytree(tiny_project / "datasets" / "synthcxr" / "pneumothorax", folder)
    path = folder / "fractions" / "train_0.1.txt"
    path.write_text(path.read_text() + "ptx-99999\n")
    with pytest.raises(DataError, match="train_0.1.txt: sha256 .* differs .* the fraction was edited"):
        labelled.fraction(folder, mf.read_manifest(folder), 0.1)


# ---------------------------------------------------------------- each task end to end


def test_segmentation_trains_registers_and_keeps_the_frozen_encoder(project):
    out = finetune.run(params(project), task="siim-seg", frac=1.0, init="g2d")
    m = json.loads(out.metrics_path.read_text())
    assert out.metrics_path.name == "siim-seg_1.0_g2d_seed42.json"
    assert m["metric"] == "dice" and 0 <= m["score"] <= 1 and m["frozen_encoder"] is True
    assert 1 <= m["best_epoch"] <= m["epochs"] <= m["steps"] and m["test_images"] > 0
    assert m["features"] == "cached" and len(m["history"]) == m["epochs"]
    assert registered(project)["g2d-siim-seg"] == [1]
    # the registered model's encoder is bit-identical to the pre-trained one
    pulled = tracking.pull_model("g2d-siim-seg/latest", project / "pulled-seg")
    tuned = load_file(str(pulled / "model.safetensors"))
    source = load_file(str(project / "models" / "pretrain" / "model.safetensors"))
    enc = [k for k in source if k.startswith("unet.encoder.")]
    assert enc and all(torch.equal(tuned[k], source[k]) for k in enc)
    # ... and its decoder, fresh (transfer: encoder), was trained: it left its seeded initialisation
    runtime.seed_everything(load_params(project / "params.yaml").seed)
    fresh = initialisation.build_unet(initialisation.resolve("g2d", params(project), project), with_decoder=False)
    dec = [k for k in fresh.state_dict() if k.startswith("decoder.") and k.endswith("weight")]
    assert dec and any(not torch.equal(tuned[f"unet.{k}"], fresh.state_dict()[k]) for k in dec)
    # evaluate scores the registered model on the same test split, same number
    again = finetune.evaluate(params(project), "siim-seg", "models:/g2d-siim-seg/latest")
    assert again["test"]["dice"] == pytest.approx(m["score"], abs=1e-6)
    shutil.rmtree(project / "pulled-seg")


def test_encoder_decoder_transfer_starts_from_the_pretrained_decoder(project):
    start = initialisation.resolve("g2d", params(project), project)
    with_dec = initialisation.build_unet(start, with_decoder=True)
    without = initialisation.build_unet(start, with_decoder=False)
    key = next(k for k in start.unet_state if k.startswith("decoder.") and k.endswith("weight"))
    assert torch.equal(with_dec.state_dict()[key], start.unet_state[key])
    assert not torch.equal(without.state_dict()[key], start.unet_state[key])
    out = finetune.run(params(project, "finetune.segmentation.transfer=encoder_decoder",
                              "finetune.segmentation.freeze_encoder=false"), task="rsna-seg", frac=1.0, init="g2d")
    assert out.metrics["frozen_encoder"] is False and 0 <= out.metrics["score"] <= 1



@pytest.mark.parametrize("head", ["fresh", "pretrained"])
def test_a_transferred_decoder_gets_a_fresh_head_at_the_prior_unless_asked(project, head):
    """The pre-training head draws pseudo masks (~15% of every body): kept, a 1% fine-tuning never learns that most
    images are empty. Fresh, it starts at `prior` as an encoder-only U-Net's head does."""
    from g2d.pipeline.finetune import segmentation

    p = params(project, "finetune.segmentation.transfer=encoder_decoder", f"finetune.segmentation.head={head}")
    start = initialisation.resolve("g2d", p, project)
    config: dict = {}
    net = segmentation.wrap(initialisation.build_unet(start, with_decoder=True), tasks.get("siim-seg"), p.finetune,
                            config)
    conv = net.unet.segmentation_head[0]
    key = next(k for k in start.unet_state if k.startswith("decoder.") and k.endswith("weight"))
    assert torch.equal(net.unet.state_dict()[key], start.unet_state[key])  # the decoder is transferred either way
    assert config["head"] == head
    if head == "fresh":
        assert torch.allclose(conv.bias, torch.tensor(math.log(0.01 / 0.99)))
        assert not torch.equal(conv.weight, start.unet_state["segmentation_head.0.weight"])
    else:
        assert torch.equal(conv.weight, start.unet_state["segmentation_head.0.weight"])
        assert torch.equal(conv.bias, start.unet_state["segmentation_head.0.bias"])


def test_a_study_variant_is_written_and_registered_apart(project):
    """The study's runs must not become `models:/g2d-siim-seg/latest` nor a cell of the finetune matrix."""
    out = finetune.run(params(project, "finetune.segmentation.transfer=encoder_decoder"), task="siim-seg",
                       frac=1.0, init="g2d", variant="encoder-decoder")
    assert out.metrics_path == (project / "metrics" / "study" / "siim-seg" / "encoder-decoder" /
                                "siim-seg_1.0_encoder-decoder_seed42.json")
    assert out.metrics["variant"] == "encoder-decoder" and out.metrics["transfer"] == "encoder_decoder"
    assert out.registered == "g2d-siim-seg-encoder-decoder" and "g2d-siim-seg" not in registered(project)
    dice = out.metrics["per_image"]["dice"]
    assert len(dice) == out.metrics["test_images"]
    assert sum(dice) / len(dice) == pytest.approx(out.metrics["score"], abs=1e-6)  # stored to 6 decimals

def test_a_full_set_epoch_gives_a_small_fraction_the_whole_cells_steps(project):
    """`finetune.detection.epoch_length: full-set` through the stage: the 20% cell trains as many steps per epoch as
    the 100% one, on a fifth of the images, and says how its epochs were made."""
    p = params(project, "finetune.detection.epoch_length=full-set", "finetune.detection.patience=5")
    small, whole = finetune.run_cells(p, "rsna-det", [0.2, 1.0], "random", [42])
    assert small.metrics["train_images"] < whole.metrics["train_images"] / 2
    per_epoch = [o.metrics["steps"] / o.metrics["epochs"] for o in (small, whole)]
    assert per_epoch[0] == per_epoch[1] == loop.steps_per_epoch(whole.metrics["train_images"], 4)
    assert small.metrics["recipe"]["epoch_length"] == "full-set"


@pytest.mark.parametrize("task", ["siim-seg", "rsna-det", "chexpert-cls"])
def test_bf16_cells_score_in_fp32_and_evaluate_agrees(project, task):
    """`compute.precision: auto` trains in bf16 on CPUs with bf16 instructions: scores, boxes and the probe stay
    fp32, and `g2d evaluate` (the same precision) gives the test score the cell recorded."""
    p = params(project, "compute.precision=bf16")
    out = finetune.run(p, task=task, frac=1.0, init="g2d")
    assert math.isfinite(out.metrics["val_loss"]) and 0 <= out.metrics["score"] <= 1
    again = finetune.evaluate(p, task, f"models:/{out.registered}/{out.version}")
    assert again["test"][out.metrics["metric"]] == pytest.approx(out.metrics["score"], abs=1e-6)
    _answers_through_mlflow(project, out, task)


def _answers_through_mlflow(project: Path, out, task: str) -> None:
    """The registered version is an MLflow model: given an image's bytes it answers with what the fine-tuned
    network predicts for that image (here at the model's own size, so nothing is resized)."""
    import io

    import mlflow
    import numpy as np

    from g2d.pipeline.zeroshot.similarity import to_model_input

    model = mlflow.pyfunc.load_model(f"models:/{out.registered}/{out.version}")
    net, config = finetune.load_model(tracking.pull_model(f"{out.registered}/{out.version}", project / "pulled-x"))
    size = int(config["image_size"])
    image = (np.random.default_rng(0).random((size, size)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    [answer] = model.predict(pd.DataFrame({"image": [buf.getvalue()]}))
    x = to_model_input(image / 255.0, size)
    with torch.no_grad():
        if task == "siim-seg":
            prob = torch.sigmoid(net(x))[0, 0].numpy()
            assert np.allclose(answer["probability"], prob, atol=1e-5)
            assert np.array_equal(answer["mask"], prob > config["threshold"])
        elif task == "chexpert-cls":
            assert answer["classes"] == list(tasks.CHEXPERT_5)
            assert np.allclose(answer["probabilities"], torch.sigmoid(net(x))[0].numpy(), atol=1e-6)
        else:
            [found] = net.decode(net.encode(x))
            keep = found["labels"] > 0
            assert np.allclose(np.reshape(answer["boxes"], (-1, 4)), found["boxes"][keep].numpy(), atol=0.01)
            assert np.allclose(answer["scores"], found["scores"][keep].numpy(), atol=1e-6)
            assert answer["labels"] == ["opacity"] * int(keep.sum())
    shutil.rmtree(project / "pulled-x")


def test_linear_probe_and_random_init(project):
    out = finetune.run(params(project), task="chexpert-cls", frac=1.0, init="random", seed=3)
    m = out.metrics
    assert m["metric"] == "auc" and m["init"] == "random" and m["init_source"] == "random"
    assert set(tasks.CHEXPERT_5) <= {k.removeprefix("auc_") for k in m["test"]}
    assert m["test"]["auc_classes"] + m["test"]["auc_classes_undefined"] == 5
    # same seed, same run
    again = finetune.run(params(project), task="chexpert-cls", frac=1.0, init="random", seed=3)
    assert json.dumps(again.metrics["test"], sort_keys=True) == json.dumps(m["test"], sort_keys=True)


def test_detection_end_to_end_from_the_registry(project):
    out = finetune.run(params(project), task="rsna-det", frac=1.0, init="models:/g2d-encoder@latest")
    assert out.metrics["init_source"] == "models:/g2d-encoder/1"
    assert out.metrics["metric"] == "map" and 0 <= out.metrics["score"] <= 1
    assert out.metrics["test"]["boxes"] > 0
    assert "g2d-rsna-det" in registered(project)


def test_multiclass_task_on_an_imported_manifest(project, tmp_path):
    """covidx-cls has no SynthCXR set: a tiny one-of-3 manifest stands in for an imported COVIDx."""
    folder = tmp_path / "covidx"
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(18):
        cls = ("normal", "pneumonia", "covid")[i % 3]
        Image.fromarray((torch.rand(32, 32) * 255).byte().numpy()).save(folder / "images" / f"{i}.png")
        rows.append({"id": f"c{i}", "image": f"images/{i}.png", "patient_id": f"p{i}",
                     "split": ("train", "train", "val", "test")[i % 4] if i < 16 else "train",
                     **{c: int(c == cls) for c in ("normal", "pneumonia", "covid")}})
    mf.write_manifest(pd.DataFrame(rows), folder)
    p = params(project, f"finetune.datasets={{\"covidx-cls\": \"{folder}\"}}")
    out = finetune.run(p, task="covidx-cls", frac=1.0, init="g2d")
    assert out.metrics["metric"] == "accuracy" and 0 <= out.metrics["score"] <= 1
    with pytest.raises(ConfigError, match="covidx-cls.*has no SynthCXR equivalent.*finetune.datasets.covidx-cls"):
        finetune.run(params(project), task="covidx-cls", frac=1.0, init="g2d")


def test_segmentation_on_an_imported_siim_records_its_protocol(project, tmp_path):
    """The path a user takes: `g2d data import` a dataset, point the task at it, train; the run carries the
    protocol's name and hash."""
    import mlflow
    from mlflow import MlflowClient

    from g2d.data import importing
    from tests.layouts import siim as layout

    layout.build(tmp_path / "raw", n=20, size=64)
    imported = importing.run("siim", tmp_path / "raw", tmp_path / "siim", "siim-patient",
                             importing.Options(image_size=64, workers=1))
    p = params(project, f"finetune.datasets={{\"siim-seg\": \"{tmp_path / 'siim'}\"}}")
    out = finetune.run(p, task="siim-seg", frac=1.0, init="g2d")
    assert out.metrics["metric"] == "dice" and 0 <= out.metrics["score"] <= 1
    run = MlflowClient().get_run(out.run_id)
    tags = run.data.tags
    assert tags["g2d.protocol"] == "siim-patient.v1" and tags["g2d.protocol_sha256"] == imported.protocol.sha256
    assert tags["g2d.data_hash"] == imported.sha256
    # the headline under one name for every task (the compare view), and the registered model's own metrics
    assert tags["g2d.metric"] == "dice" and run.data.metrics["test/score"] == run.data.metrics["test/dice"]
    [output] = run.outputs.model_outputs
    linked = {m.key: m.value for m in MlflowClient().get_logged_model(output.model_id).metrics}
    assert linked["test/score"] == pytest.approx(out.metrics["score"]) and "val_best" in linked
    assert len(MlflowClient().get_metric_history(out.run_id, "test/score")) == 1
    # registering loaded the model (MLflow checks the input example) without leaving it the process's active
    # model, under which every later cell's metrics would be filed
    assert mlflow.get_active_model_id() is None


# ---------------------------------------------------------------- bad inputs: one line, exit 1, nothing left


@pytest.mark.parametrize("args, message", [
    (["--frac", "0"], "--frac 0: a label fraction must be in (0, 1]"),
    (["--frac", "1.5"], "--frac 1.5: a label fraction must be in (0, 1]"),
    (["--frac", "-0.1"], "--frac -0.1: a label fraction must be in (0, 1]"),
    (["--frac", "abc"], "--frac 'abc' is not a number"),
    (["--task", "siim-sag"], "unknown task 'siim-sag': did you mean 'siim-seg'?"),
    (["--init", "models/nothing-here"], "--init models/nothing-here: no such file or folder"),
    (["--init", "global"], "--init global: "),  # the global-only model is not trained in this project
    (["--init", "g2d-encoder@champion"], "model 'g2d-encoder' has no alias 'champion'"),
    (["--frac", "0.001"], "empty subset; the smallest usable fraction is"),
    (["--frac", "nan"], "--frac nan: a label fraction must be in (0, 1]"),
    (["--frac", "inf"], "--frac inf: a label fraction must be in (0, 1]"),
    (["--init", "broken.pt"], "broken.pt: not a readable g2d pre-training checkpoint"),
])
def test_bad_inputs_fail_in_one_line_and_leave_nothing(project, args, message):
    (project / "broken.pt").write_bytes(b"not a checkpoint")
    before_models, before_runs = registered(project), runs(project)
    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and "━" not in line]
    assert len(lines) == 1 and lines[0].startswith("g2d: error: ") and message in lines[0], result.output
    assert registered(project) == before_models and runs(project) == before_runs


def test_a_downstream_model_is_not_an_encoder(project):
    finetune.run(params(project), task="siim-seg", frac=1.0, init="g2d")
    before_models, before_runs = registered(project), runs(project)
    result = CliRunner().invoke(app, ["train", "--task", "rsna-seg", "--init", "models:/g2d-siim-seg/latest"])
    assert result.exit_code == 1
    assert "a segmentation model (task siim-seg), not a pre-trained encoder" in result.output
    assert registered(project) == before_models and runs(project) == before_runs
    # and the other way round: an encoder is not a model to evaluate
    result = CliRunner().invoke(app, ["evaluate", "--task", "siim-seg", "--model", "models/pretrain"])
    assert result.exit_code == 1 and "a g2d-encoder model, not a fine-tuned downstream model" in result.output
    result = CliRunner().invoke(app, ["evaluate", "--task", "rsna-det", "--model", "g2d-siim-seg/latest"])
    assert result.exit_code == 1 and "task rsna-det needs a detection model" in result.output
    result = CliRunner().invoke(app, ["evaluate", "--task", "rsna-seg", "--model", "g2d-siim-seg/latest"])
    assert result.exit_code == 1 and "task rsna-seg needs a segmentation model of ['opacity']" in result.output
    result = CliRunner().invoke(app, ["evaluate", "--task", "siim-seg", "--model", "g2d-nothing/latest"])
    assert result.exit_code == 1 and "no registered model 'g2d-nothing'" in result.output


def test_train_cli_and_checkpoint_init(project):
    ckpt = project / "models" / "pretrain-checkpoints" / "checkpoint.pt"
    result = CliRunner().invoke(app, ["train", "--frac", "1", "--init", str(ckpt)])
    assert result.exit_code == 0, result.output
    assert "siim-seg 100% labels" in result.output and "registered g2d-siim-seg version" in result.output
    m = json.loads(next((project / "metrics" / "finetune").rglob("siim-seg_1.0_*.json")).read_text())
    assert m["init_source"] == "models/pretrain-checkpoints/checkpoint.pt"


# ---------------------------------------------------------------- report


def test_report_tables_and_curves(project):
    folder = project / "metrics" / "finetune"
    folder.mkdir(parents=True, exist_ok=True)
    for task, metric in (("siim-seg", "dice"), ("chexpert-cls", "auc")):
        for frac in (0.01, 1.0):
            for init, score in (("g2d", 0.6), ("global", 0.5), ("random", 0.3)):
                for seed, noise in ((42, -0.01), (43, 0.01)):  # the table shows the mean over seeds
                    (folder / f"{task}_{frac!r}_{init}_seed{seed}.json").write_text(json.dumps(
                        {"task": task, "frac": frac, "init": init, "metric": metric, "seed": seed,
                         "score": score * frac ** 0.1 + noise, "train_images": 10}))
    (folder / "siim-seg_0.5_g2d_seed42.json").write_text(json.dumps(
        {"task": "siim-seg", "frac": 0.5, "init": "g2d", "metric": "dice", "score": 0.5, "train_images": 8,
         "seed": 42}))
    out = report.run(params(project, "matrix.fractions=[0.01, 1.0]", "matrix.seeds=[42, 43]"))
    md = out.markdown.read_text()
    assert "## Table 1" in md and "## Table 4" in md and out.cells == 12 and "(up to 2)" in md
    assert "`siim-seg_0.5_g2d_seed42.json`: siim-seg 0.5 init g2d" in md.split("## Other runs")[1]  # not tabled
    assert out.study.is_file() and "60.0 ± 1.4 [" in out.study.read_text()  # the study: the spread over seeds
    g2d_row = next(line for line in md.splitlines() if line.startswith("| G2D |") and "**" in line)
    assert g2d_row.count("**60.0**") == 1  # siim-seg 100%: G2D best, in bold
    lines = md.splitlines()
    assert lines.index(next(x for x in lines if x.startswith("| Random init"))) < lines.index(g2d_row)
    csv = (project / "reports" / "curves" / "siim-seg.csv").read_text().splitlines()
    assert csv[0] == "frac,random,global,g2d" and csv[2].startswith("1,")
    assert out.figure == project / "reports" / "learning_curves.png" and out.figure.stat().st_size > 5000
    assert "![learning_curves](learning_curves.png)" in out.study.read_text()  # one figure, both reports
    (folder / "broken.json").write_text("{")
    with pytest.raises(DataError, match="broken.json: not a g2d fine-tuning metrics file"):
        report.run(params(project, "matrix.fractions=[0.01, 1.0]", "matrix.seeds=[42, 43]"))


def test_matrix_inits_must_be_named(project):
    with pytest.raises(ConfigError, match=r"matrix.inits \['imagenet'\] are not names in finetune.inits"):
        params(project, 'matrix.inits=["g2d", "imagenet"]')


def test_fit_stops_early_and_restores_the_best_val_loss_weights():
    """A scripted val loss: lowest after epoch 2, then 2 epochs without a lower one with patience 2."""
    from g2d.config import Recipe

    model = torch.nn.Linear(2, 1)
    x, y = torch.randn(8, 2), torch.randn(8, 1)
    curve = iter([0.5, 0.3, 0.4, 0.3, 0.1])
    snapshots = {}

    def validate() -> dict:
        snapshots[len(snapshots) + 1] = model.weight.detach().clone()
        return {"loss": next(curve), "score": 0.5}

    recipe = Recipe(batch_size=4, epochs=20, lr=0.1, patience=2)
    result = loop.fit(model, 8, recipe, 0, lambda idx, epoch: ((model(x[idx]) - y[idx]) ** 2).mean(), validate)
    assert (result.best_epoch, result.best_loss, result.epochs, result.steps, result.stopped_early) == \
        (2, 0.3, 4, 8, True)
    assert torch.equal(model.weight, snapshots[2])  # the weights of epoch 2, not the last ones
    assert [h[:2] for h in result.history] == [[1, 2], [2, 4], [3, 6], [4, 8]]
    # monitored by the score instead (detection's mAP): the highest wins
    curve = iter([0.5, 0.3, 0.4, 0.3, 0.1])
    result = loop.fit(model, 8, recipe.model_copy(update={"monitor": "score"}), 0,
                      lambda idx, epoch: ((model(x[idx]) - y[idx]) ** 2).mean(),
                      lambda: {"loss": 1.0, "score": next(curve)})
    assert (result.best_epoch, result.best_score, result.epochs) == (1, 0.5, 3)


def test_steps_grow_with_the_train_set():
    """Budgets are epochs: 10x the rows, 10x the steps (MGCA), the last partial batch kept."""
    from g2d.config import Recipe

    recipe = Recipe(batch_size=8, epochs=3, patience=10)
    model = torch.nn.Linear(1, 1)

    def steps(n: int) -> int:
        x = torch.randn(n, 1)
        return loop.fit(model, n, recipe, 0, lambda idx, epoch: model(x[idx]).pow(2).mean(),
                        lambda: {"loss": 1.0, "score": 0.0}).steps

    assert [steps(n) for n in (7, 70, 700)] == [3, 27, 264]
    batches = loop.epoch_batches(17, 8, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [8, 8, 1] and sorted(torch.cat(batches).tolist()) == list(range(17))
    assert [len(b) for b in loop.epoch_batches(17, 8, torch.Generator().manual_seed(0), world=2)] == [8, 9]


def test_a_full_set_epoch_gives_every_fraction_the_steps_of_the_whole_train_split():
    """`epoch_length: full-set`: a 1% or 10% cell passes over its images again, in fresh orders, until its epoch
    has as many rows as the train split (so its budget is the 100% cell's in steps); a 100% cell is unchanged."""
    from g2d.config import Recipe

    recipe = Recipe(batch_size=8, epochs=3, patience=10, epoch_length="full-set")
    model = torch.nn.Linear(1, 1)
    seen: list[torch.Tensor] = []

    def steps(n: int, split: int) -> int:
        x = torch.randn(n, 1)
        seen.clear()

        def step_loss(idx, epoch):
            seen.append(idx)
            return model(x[idx]).pow(2).mean()

        return loop.fit(model, n, recipe, 0, step_loss, lambda: {"loss": 1.0, "score": 0.0},
                        epoch_rows=loop.epoch_rows(recipe, split)).steps

    assert [steps(n, 700) for n in (7, 700, 70)] == [264, 264, 264]
    per_epoch = torch.cat(seen[:88])  # a 700-row epoch of the 70-image cell: each image 10 times, in 10 orders
    assert torch.bincount(per_epoch, minlength=70).tolist() == [10] * 70
    passes = [per_epoch[i:i + 70] for i in range(0, 700, 70)]
    assert all(sorted(p.tolist()) == list(range(70)) for p in passes) and not torch.equal(passes[0], passes[1])
    one_pass = loop.epoch_batches(700, 8, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(one_pass, loop.epoch_batches(
        700, 8, torch.Generator().manual_seed(0), rows=700), strict=True))  # the 100% cell: as before
    cut = loop.epoch_batches(7, 8, torch.Generator().manual_seed(0), rows=20)  # 20 rows: 3 passes, cut at 20
    assert [len(b) for b in cut] == [8, 8, 4]
    assert loop.epoch_rows(Recipe(), 700) == 0  # the default, MGCA's: one pass


def test_cached_maps_equal_the_frozen_encoder_output(project):
    """The maps a cell trains on are the frozen encoder's on the same images, whichever rows a run asks for
    first, and decoding them gives the network's own output."""
    from g2d.pipeline.finetune import features, segmentation

    p = params(project)
    spec = tasks.get("siim-seg")
    folder = tasks.dataset_folder(spec, p, project)
    train = labelled.load_split(folder, mf.read_manifest(folder), "train", spec, p.finetune.image_size)
    start = initialisation.resolve("g2d", p, project)
    net = segmentation.wrap(initialisation.build_unet(start, False), spec, p.finetune, {}).eval()
    cache = features.FeatureCache(1.0)
    inputs = features.inputs(net, net.encoder, [train], None, None, frozen=True, cache=cache)
    assert inputs.cached and cache.nbytes == 0  # nothing computed until asked
    rows = torch.tensor([len(train) - 1, 0, 3])
    got = inputs.maps[0](rows)
    with torch.no_grad():
        direct = net.encode(train.images[rows])
        assert all(torch.equal(a, b) for a, b in zip(got, direct, strict=True))
        assert torch.equal(net.decode(got), net(train.images[rows]))
    whole = inputs.maps[0].all()
    assert all(torch.equal(w[rows], g) for w, g in zip(whole, got, strict=True))
    # the same encoder weights give the same cache entry
    again = features.inputs(net, net.encoder, [train], None, None, frozen=True, cache=cache)
    assert again.maps[0] is inputs.maps[0]
    # too big for the budget: the encoder runs on every batch, with the same numbers
    small = features.inputs(net, net.encoder, [train], None, None, frozen=True, cache=features.FeatureCache(1e-6))
    assert not small.cached
    assert all(torch.equal(a, b) for a, b in zip(small.maps[0](rows), got, strict=True))


def test_balanced_train_set_is_every_positive_and_as_many_seeded_negatives(project):
    p = params(project)
    spec = tasks.get("siim-seg")
    folder = tasks.dataset_folder(spec, p, project)
    df = mf.read_manifest(folder)
    train = labelled.load_split(folder, df, "train", spec, p.finetune.image_size)
    chosen = labelled.fraction(folder, df, 1.0)
    positive = {i for i, m in zip(train.ids, train.masks.flatten(1).any(1).tolist(), strict=True) if m}
    out = labelled.balanced(chosen, train, seed=42)
    kept_pos, kept_neg = set(out.ids) & positive, set(out.ids) - positive
    assert kept_pos == positive & set(chosen.ids)
    assert len(kept_neg) == min(len(kept_pos), len(set(chosen.ids) - positive))
    assert out.ids == sorted(out.ids) and "balanced" in out.source and out.sha256 == labelled._ids_sha256(out.ids)
    assert labelled.balanced(chosen, train, seed=42).ids == out.ids  # seeded
    # with fewer positives than negatives, another seed draws other negatives
    few = labelled.Fraction(1.0, sorted([*sorted(positive)[:2], *sorted(set(train.ids) - positive)]), "x", "hand")
    draws = {tuple(labelled.balanced(few, train, seed=s).ids) for s in range(5)}
    assert len(draws) > 1 and all(len(d) == 4 for d in draws)
    empty = labelled.Fraction(0.5, sorted(set(train.ids) - positive), "x", "fractions/train_0.5.txt")
    with pytest.raises(DataError, match=r"fractions/train_0.5.txt: the 0.5 label fraction of train \(\d+ images\) has "
                                        r"no image with a finding.*finetune.segmentation.balanced to \[\]"):
        labelled.balanced(empty, train, seed=42)


def test_a_cell_alone_writes_the_bytes_of_the_grouped_stage(project):
    """`g2d train --matrix` (every fraction and seed in one process, the DVC stage) and one cell on its own write
    the same metrics file byte for byte, and more labels mean more steps."""
    p = params(project, "matrix.fractions=[0.5, 1.0]", "matrix.seeds=[42, 7]")
    result = CliRunner().invoke(app, ["train", "--task", "siim-seg", "--init", "random", "--matrix",
                                      "--set", "matrix.fractions=[0.5, 1.0]", "--set", "matrix.seeds=[42, 7]"])
    assert result.exit_code == 0, result.output
    folder = project / "metrics" / "finetune" / "siim-seg" / "random"
    grouped = {f.name: f.read_bytes() for f in sorted(folder.glob("*.json"))}
    assert sorted(grouped) == ["siim-seg_0.5_random_seed42.json", "siim-seg_0.5_random_seed7.json",
                               "siim-seg_1.0_random_seed42.json", "siim-seg_1.0_random_seed7.json"]
    alone = finetune.run(p, task="siim-seg", frac=0.5, init="random", seed=7)
    assert alone.metrics_path.read_bytes() == grouped["siim-seg_0.5_random_seed7.json"]
    half, whole = (json.loads(grouped[f"siim-seg_{f}_random_seed42.json"]) for f in ("0.5", "1.0"))
    assert whole["train_images"] > half["train_images"]
    assert whole["steps"] / whole["epochs"] > half["steps"] / half["epochs"]
    result = CliRunner().invoke(app, ["train", "--matrix", "--frac", "0.1"])
    assert result.exit_code == 1 and "--matrix runs matrix.fractions x matrix.seeds; give it without --frac" in \
        result.output


def test_augmented_views_move_image_and_mask_together():
    from g2d.config import Augment
    from g2d.data import augment

    images = torch.zeros(3, 1, 32, 32)
    images[:, :, 8:20, 10:22] = 1.0
    masks = images > 0.5
    one = augment.views(Augment(views=2), images, masks, ["a", "b", "c"], seed=1)
    alone = augment.views(Augment(views=2), images[1:2], masks[1:2], ["b"], seed=1)
    assert len(one) == 2 and torch.equal(one[1][0][1:2], alone[1][0])  # a view depends on its image id only
    for im, mk in one:
        assert mk.dtype == torch.bool and not torch.equal(im, images)
        assert ((im > 0.5) == mk).float().mean() > 0.97  # the mask went where the image went


def test_multiclass_rows_need_one_known_label(tmp_path):
    """One-of-K: a blank is 'not this class' (CheXpert 5x200 leaves the other classes blank), but a row needs
    exactly one 1 and no uncertain value."""
    folder = tmp_path / "cx"
    (folder / "images").mkdir(parents=True)
    Image.fromarray((torch.rand(16, 16) * 255).byte().numpy()).save(folder / "images" / "a.png")
    cells = {"a": ("", 0, 0), "b": (1, -1, ""), "c": (1, "", ""), "d": ("", 1, 1)}
    rows = [{"id": i, "image": "images/a.png" if i == "a" else f"images/{i}.png", "patient_id": i, "split": "test",
             "normal": n, "pneumonia": p, "covid": c} for i, (n, p, c) in cells.items()]
    for i in "bcd":
        shutil.copy(folder / "images" / "a.png", folder / "images" / f"{i}.png")
    mf.write_manifest(pd.DataFrame(rows), folder)
    with pytest.raises(DataError, match=r"needs exactly one of \['normal', 'pneumonia', 'covid'\] = 1 per row; rows "
                                        r"\['a', 'b', 'd'\]"):
        labelled.load_split(folder, mf.read_manifest(folder), "test", tasks.get("covidx-cls"), 16)
    ok = mf.read_manifest(folder)
    split = labelled.load_split(folder, ok[ok["id"] == "c"], "test", tasks.get("covidx-cls"), 16)
    assert split.labels.tolist() == [[1.0, 0.0, 0.0]]


def test_a_fresh_segmentation_head_starts_predicting_no_finding(project):
    from g2d.pipeline.finetune import segmentation

    p = params(project)
    start = initialisation.resolve("g2d", p, project)
    net = segmentation.wrap(initialisation.build_unet(start, False), tasks.get("siim-seg"), p.finetune, {})
    with torch.no_grad():
        probs = torch.sigmoid(net(torch.rand(2, 1, 64, 64)))
    assert torch.sigmoid(net.unet.segmentation_head[0].bias).item() == pytest.approx(0.01)
    assert (probs < 0.5).float().mean() > 0.9  # nothing above the Dice threshold at the start


def test_the_convergence_benchmark_against_a_rerun_here_at_the_same_budget_moves_nothing(project, monkeypatch,
                                                                                          tmp_path):
    """`benchmarks/convergence.py --baseline here` trains the default budget and the changed one on this machine:
    with nothing changed (`--factor 1`) the two agree to the last digit, so a move it reports is the change's.
    Its runs go to a throwaway store, not the project's."""
    import runpy
    import sys

    before = runs(project)
    out = tmp_path / "convergence.json"
    monkeypatch.setattr(sys, "argv", ["convergence.py", "--task", "chexpert-cls", "--params",
                                      str(project / "params.yaml"), "--inits", "random", "--fracs", "0.5", "1.0",
                                      "--baseline", "here", "--factor", "1", "--json", str(out)])
    runpy.run_path(str(ROOT / "benchmarks" / "convergence.py"), run_name="__main__")
    rows = json.loads(out.read_text())
    assert [(r["frac"], r["init"]) for r in rows] == [(0.5, "random"), (1.0, "random")]
    for r in rows:
        assert r["scores"] == r["scores_2x"] and r["move"] == 0 and r["holds"]
        assert r["epochs"] == r["epochs_2x"] and len(r["scores"]) == len(params(project).matrix.seeds)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / f'mlflow-{tmp_path.name}.db'}")
    assert runs(project) == before
