"""Zero-shot classification, grounding and the inference API on a tiny SynthCXR: prompts as specified,
metrics equal to hand-computed values, heat maps at the image's size, DICOM (MONOCHROME1) input, the
stages end to end, and every bad input with its message."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
import yaml
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner

import g2d
from g2d.cli import app
from g2d.config import Model, Zeroshot, load_params
from g2d.data import manifest as mf
from g2d.errors import ConfigError, DataError
from g2d.pipeline.zeroshot import grounding, grounding_metrics, similarity
from g2d.pipeline.zeroshot import stage as zeroshot

# ---------------------------------------------------------------- prompts


def test_prompts_are_built_from_the_templates():
    cfg = Zeroshot(positive=("{finding}", "there is {finding}"), negative=("no {finding}", "no evidence of {finding}"),
                   phrases={"effusion": "pleural effusion"})
    effusion, mass = similarity.class_prompts(["effusion", "nodule_mass"], cfg)
    assert effusion.positive == ("pleural effusion", "there is pleural effusion")
    assert effusion.negative == ("no pleural effusion", "no evidence of pleural effusion")
    assert mass.positive == ("nodule mass", "there is nodule mass")  # no phrase given: the name, '_' as spaces
    single = similarity.class_prompts(["effusion"], cfg.model_copy(update={"ensemble": False}))[0]
    assert single.positive == ("pleural effusion",) and single.negative == ("no pleural effusion",)


def test_finding_phrases_say_what_and_where():
    cfg = Zeroshot()
    assert similarity.finding_phrase({"kind": "opacity", "side": "left", "zone": "lower"}, cfg) == \
        "lung opacity in the left lower lung"
    assert similarity.finding_phrase({"kind": "effusion", "side": "bilateral", "zone": "lower"}, cfg) == \
        "bilateral pleural effusion in the lower lungs"
    assert similarity.finding_phrase({"kind": "edema", "side": "bilateral", "zone": "diffuse"}, cfg) == \
        "bilateral pulmonary edema"
    assert similarity.finding_phrase({"kind": "cardiomegaly", "side": "bilateral", "zone": "lower"}, cfg) == \
        "cardiomegaly"


def test_ensemble_is_the_normalised_mean():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(similarity.ensemble(torch.stack([a, b])), torch.tensor([1.0, 1.0]) / math.sqrt(2))


@pytest.mark.parametrize(("override", "message"), [
    ('zeroshot.positive=["finding"]', "each template needs {finding} exactly once"),
    ('zeroshot.negative=["no {finding} or {finding}"]', "each template needs {finding} exactly once"),
    ("zeroshot.grounding.thresholds=[0.5, 1.5]", "thresholds must lie in (0, 1)"),
    ("zeroshot.datasets.mscxr=x", "unknown task(s) ['mscxr']"),
    ('matrix.encoders=["g2d", "biovil"]', "matrix.encoders ['biovil'] are not names in finetune.inits"),
])
def test_bad_zeroshot_params_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_params(Path(__file__).resolve().parents[1] / "params.yaml", [override])
    assert message in str(err.value)


# ---------------------------------------------------------------- metrics by hand

HEAT = torch.tensor([[0, 0, 0, 0], [0, 1, 2, 0], [0, 3, 4, 0], [0, 0, 0, 0]], dtype=torch.float32)
CENTRE = torch.zeros(4, 4, dtype=torch.bool)
CENTRE[1:3, 1:3] = True
CORNER = torch.zeros(4, 4, dtype=torch.bool)
CORNER[0, 0] = True


def test_grounding_metrics_equal_hand_computed_values():
    heat, truth = torch.stack([HEAT, HEAT]), torch.stack([CENTRE, CORNER])
    assert grounding_metrics.pointing_hits(heat, truth).tolist() == [True, False]  # the maximum, 4, is central
    assert grounding_metrics.pointing_chance(truth).tolist() == [4 / 16, 1 / 16]
    # with the maximum's pixel outside the body, the next highest (3, also central) wins
    body = torch.ones(2, 4, 4, dtype=torch.bool)
    body[:, 2, 2] = False
    assert grounding_metrics.pointing_hits(heat, truth, body).tolist() == [True, False]
    assert grounding_metrics.pointing_chance(truth, body).tolist() == pytest.approx([3 / 15, 1 / 15])
    # scaled to [0, 1] the map is HEAT / 4; at 0.5 it keeps the pixels 2, 3, 4: all three inside the centre
    iou, dice = grounding_metrics.overlap(similarity.scale01(heat), truth, 0.5)
    assert iou.tolist() == pytest.approx([3 / 4, 0.0])
    assert dice.tolist() == pytest.approx([2 * 3 / (3 + 4), 0.0])
    # centre: inside 1, 2, 3, 4 (mean 2.5, variance 1.25), outside twelve zeros
    # corner: inside one 0; outside eleven zeros and 1, 2, 3, 4 (mean 2/3, variance 30/15 - 4/9)
    expected = [2.5 / math.sqrt(1.25), (2 / 3) / math.sqrt(2 - 4 / 9)]
    assert grounding_metrics.cnr(heat, truth).tolist() == pytest.approx(expected, rel=1e-6)
    empty = torch.zeros(1, 4, 4, dtype=torch.bool)
    assert math.isnan(float(grounding_metrics.cnr(HEAT[None], empty)[0]))


def test_threshold_is_the_best_val_dice_and_cnr_ignores_scale():
    heat, truth = HEAT[None], CENTRE[None]
    best, scores = grounding_metrics.choose_threshold(similarity.scale01(heat), truth, (0.2, 0.5, 0.9))
    assert best == 0.2 and scores[0.2] == pytest.approx(1.0)  # 0.2 keeps exactly the four centre pixels
    assert scores[0.9] == pytest.approx(2 * 1 / (1 + 4))
    assert torch.allclose(grounding_metrics.cnr(3 * heat - 1, truth), grounding_metrics.cnr(heat, truth))


def test_zero_shot_scores_equal_hand_computed_values():
    # score > 0 calls "present"; class a: labels 1 1 0 0, calls 1 0 1 0 -> TP 1 FP 1 FN 1: F1 0.5, accuracy 0.5
    scores = torch.tensor([[0.3, -0.1], [-0.2, 0.2], [0.1, 0.4], [-0.4, -0.3]])
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, float("nan")]])
    out = zeroshot.binary_scores(scores, labels, ("a", "b"))
    assert out["f1_a"] == pytest.approx(0.5) and out["accuracy_a"] == pytest.approx(0.5)
    assert out["auc_a"] == pytest.approx(0.75)  # positives 0.3, -0.2 vs negatives 0.1, -0.4: 3 of 4 pairs
    # class b (last row unknown): labels 0 1 1, calls 0 1 1 -> perfect
    assert out["f1_b"] == pytest.approx(1.0) and out["accuracy_b"] == pytest.approx(1.0) and out["auc_b"] == 1.0
    assert out["f1"] == pytest.approx(0.75) and out["accuracy"] == pytest.approx(0.75)
    assert out["chance_accuracy_majority"] == pytest.approx((0.5 + 2 / 3) / 2)
    multi = zeroshot.multiclass_scores(torch.tensor([[2.0, 1.0], [0.0, 1.0], [3.0, 0.0]]),
                                       torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), ("a", "b"))
    assert multi["accuracy"] == pytest.approx(2 / 3) and multi["chance_accuracy"] == pytest.approx(2 / 3)
    assert multi["f1_a"] == pytest.approx(2 / 3) and multi["f1_b"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------- what the heat maps are


def test_local_embeddings_make_up_the_pooled_embedding():
    """With one head, the pooled embedding is the attention-weighted mean of the per-location vectors the
    heat maps compare with the prompt (and of the mean token's): the maps live in the shared space."""
    from g2d.model.g2d import G2D

    torch.manual_seed(0)
    cfg = Model(text_model="tiny", embed_dim=16, heads=1, decoder_channels=(16, 8, 8, 4, 4), text_frozen_layers=1)
    model = G2D(cfg, vocab_size=64, image_size=64).eval()
    with torch.no_grad():
        out = model.encode_image(torch.rand(2, 1, 64, 64))
        local = model.pool.local_embeddings(out.projected_map).flatten(2)  # (B, d, hw)
        weights = out.attention.flatten(1)  # (B, hw), the query's weights on the pixels
        mean = out.projected_map.flatten(2).mean(2, keepdim=True)  # the mean token, with its own position
        pos0 = model.pool._positions(*out.projected_map.shape[-2:])[:1]
        attn = model.pool.attn
        d = cfg.embed_dim
        mean_local = attn.out_proj(torch.nn.functional.linear(mean.transpose(1, 2) + pos0, attn.in_proj_weight[2 * d:],
                                                              attn.in_proj_bias[2 * d:]))[:, 0]
        rebuilt = (local * weights[:, None]).sum(2) + (1 - weights.sum(1, keepdim=True)) * mean_local
    assert torch.allclose(rebuilt, out.embedding, atol=1e-5)


# ---------------------------------------------------------------- the tiny project


def _gradient(h: int = 50, w: int = 70) -> np.ndarray:
    """An 8-bit image spanning 0..255, so min-max scaling of any monotone re-encoding gives it back."""
    y, x = np.mgrid[0:h, 0:w]
    img = ((x * 3 + y * 2) % 256).astype(np.uint8)
    img[0, 0], img[-1, -1] = 0, 255
    return img


def _dicom(path: Path, pixels: np.ndarray, photometric: str) -> Path:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_predict_gives_heat_maps_at_the_image_size(project):
    img = _gradient()
    out = g2d.predict(img, ["pleural effusion", "no pleural effusion", "cardiomegaly"], model="g2d")
    assert out.heatmaps.shape == (3, 50, 70) and out.scores.shape == (3,)
    assert np.all(np.abs(out.heatmaps) <= 1 + 1e-5) and np.all(np.abs(out.scores) <= 1 + 1e-5)
    assert out.model == "models/pretrain"
    # the same model pulled from the registry gives the same numbers
    again = g2d.predict(img / 255.0, ["pleural effusion", "no pleural effusion", "cardiomegaly"],
                        model=g2d.load_model("models:/g2d-encoder/latest"))
    assert again.model == "models:/g2d-encoder/1"
    assert np.allclose(again.heatmaps, out.heatmaps, atol=1e-5) and np.allclose(again.scores, out.scores, atol=1e-5)


def test_dicom_input_monochrome1_included_predicts_like_the_png(project, tmp_path):
    img = _gradient()
    Image.fromarray(img).save(tmp_path / "x.png")
    _dicom(tmp_path / "m2.dcm", img.astype(np.uint16) * 16, "MONOCHROME2")  # 12-bit, same picture
    _dicom(tmp_path / "m1.dcm", (255 - img.astype(np.uint16)) * 16, "MONOCHROME1")  # stored inverted
    model = g2d.load_model("g2d")
    png = g2d.predict(tmp_path / "x.png", ["lung opacity"], model=model)
    for name in ("m2.dcm", "m1.dcm"):
        dcm = g2d.predict(tmp_path / name, ["lung opacity"], model=model)
        assert np.allclose(dcm.image, png.image, atol=1e-6), name
        assert np.allclose(dcm.heatmaps, png.heatmaps, atol=1e-5) and np.allclose(dcm.scores, png.scores, atol=1e-5)


def test_explain_draws_a_dicom_with_its_box(project, tmp_path):
    img = _gradient()
    dcm = _dicom(tmp_path / "chest.dcm", (255 - img.astype(np.uint16)) * 16, "MONOCHROME1")
    out = tmp_path / "heat.png"
    result = CliRunner().invoke(app, ["explain", str(dcm), "--prompt", "lung opacity", "--prompt", "no lung opacity",
                                      "--box", "10,5,40,30", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "'lung opacity', maximum" in result.output and "the box" in result.output
    assert "70 x 50 px" in result.output
    with Image.open(out) as im:
        assert im.size[0] > im.size[1] > 200  # three panels side by side


@pytest.mark.parametrize(("args", "message"), [
    (["--box", "1,2,3"], "--box '1,2,3': expected four numbers x0,y0,x1,y1"),
    (["--box", "10,10,5,20"], "needs x1 > x0 and y1 > y0"),
    (["--model", "random"], "a random network has no trained text tower"),
    (["--model", "models:/nope/latest"], "not a registered model (no registered model 'nope'"),
])
def test_explain_bad_inputs(project, tmp_path, args, message):
    Image.fromarray(_gradient()).save(tmp_path / "x.png")
    result = CliRunner().invoke(app, ["explain", str(tmp_path / "x.png"), "--prompt", "opacity", *args])
    assert result.exit_code == 1
    assert message in result.output


def test_explain_unreadable_images(project, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    for path, message in ((tmp_path / "missing.dcm", "missing.dcm does not exist"),
                          (tmp_path / "broken.png", "cannot decode")):
        result = CliRunner().invoke(app, ["explain", str(path), "--prompt", "opacity"])
        assert result.exit_code == 1 and message in result.output and str(path.name) in result.output


def test_zeroshot_and_ground_end_to_end(project):
    from mlflow import MlflowClient

    for command, folder in (("zeroshot", "zeroshot"), ("ground", "grounding")):
        result = CliRunner().invoke(app, [command, "--model", "g2d"])
        assert result.exit_code == 0, result.output
        m = json.loads((project / "metrics" / folder / "synthcxr_g2d.json").read_text())
        assert m["model_source"] == "models/pretrain" and m["split"] == "test" and m["data_hash"]
    zs = json.loads((project / "metrics" / "zeroshot" / "synthcxr_g2d.json").read_text())
    assert zs["metric"] == "auc" and "normal" not in zs["classes"] and "effusion" in zs["classes"]
    assert zs["prompts"]["effusion"]["negative"][0] == "no pleural effusion"
    gr = json.loads((project / "metrics" / "grounding" / "synthcxr_g2d.json").read_text())
    t = gr["test"]
    assert t["targets"] >= 1 and 0 <= t["pointing"] <= 1 and 0 < t["pointing_chance"] < 1
    assert t["pointing_chance"] <= t["pointing_body_chance"] < 1  # the body is part of the image
    assert t["threshold"] in load_params("params.yaml").zeroshot.grounding.thresholds
    assert (project / "reports" / "grounding" / "synthcxr_g2d.png").stat().st_size > 10_000
    # every target's hit is kept under its id, with the pre-training seed, for paired comparisons
    per = gr["per_target"]
    assert gr["model_seed"] == load_params("params.yaml").seed and gr["variant"] is None
    assert len(per["id"]) == len(set(per["id"])) == len(per["pointing"]) == t["targets"]
    assert sum(per["pointing"]) / t["targets"] == pytest.approx(t["pointing"])
    client = MlflowClient()
    for job, artifact in (("g2d-zeroshot", "figures/synthcxr_g2d.png"), ("g2d-ground", "figures/synthcxr_g2d.png")):
        [exp] = [e for e in client.search_experiments() if e.name == job]
        [run] = client.search_runs([exp.experiment_id])
        assert run.info.status == "FINISHED" and run.data.tags["g2d.model"] == "models/pretrain"
        assert artifact in {a.path for a in client.list_artifacts(run.info.run_id, "figures")}


def test_ground_an_ablation_rerun_with_its_seed(project):
    """`g2d ground --variant V --seed S` grounds models/ablations/V-seedS, beside the other ablations."""
    folder = project / "models" / "ablations" / "g2d-seed43"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(project / "models" / "pretrain", folder)
    saved = yaml.safe_load((folder / "params.yaml").read_text())
    (folder / "params.yaml").write_text(yaml.safe_dump({**saved, "seed": 43}))
    result = CliRunner().invoke(app, ["ground", "--variant", "g2d", "--seed", "43"])
    assert result.exit_code == 0, result.output
    m = json.loads((project / "metrics" / "ablations" / "grounding" / "synthcxr_g2d-seed43.json").read_text())
    assert m["variant"] == "g2d" and m["model_seed"] == 43 and m["model_source"] == "models/ablations/g2d-seed43"
    assert (project / "reports" / "grounding" / "ablations" / "synthcxr_g2d-seed43.png").is_file()


def test_grounding_targets_from_findings_masks_and_boxes(project):
    params = load_params("params.yaml")
    folder = project / "datasets" / "synthcxr"
    pre = pd.concat([mf.read_manifest(folder / "pretrain")])
    t = grounding.load_targets(folder / "pretrain", pre, "test", 64, params.zeroshot)
    n_findings = sum(len(json.loads(f)) for f in pre.loc[pre["split"] == "test", "findings"])
    assert len(t) + sum(v for k, v in t.dropped.items() if k.startswith("findings")) == n_findings
    assert all(m.shape == (64, 64) and m.any() for m in t.truth)
    opacity = mf.read_manifest(folder / "opacity")
    boxes = grounding.load_targets(folder / "opacity", opacity, "test", 64, params.zeroshot)
    negatives = int(((opacity["split"] == "test") & (opacity["opacity"] == 0)).sum())
    assert boxes.dropped["images without a finding to ground"] == negatives
    assert all(p.startswith("lung opacity in the") for p in boxes.phrases)


def _one_of_five(project: Path) -> Path:
    """A CheXpert-5x200-like manifest as `g2d data import chexpert --protocol chexpert-5x200` writes it (one of
    the five findings positive, the others 0 or blank, the other CheXpert columns too) on tiny SynthCXR images."""
    src = project / "datasets" / "synthcxr" / "pretrain"
    out = project / "datasets" / "cx5"
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, row in mf.read_manifest(src).head(10).iterrows():
        shutil.copy(src / row["image"], out / "images" / Path(row["image"]).name)
        labels = dict.fromkeys(("atelectasis", "cardiomegaly", "consolidation", "edema", "effusion"),
                               0 if i % 2 else "")
        labels[list(labels)[i % 5]] = 1
        others = {"no_finding": "", "lung_opacity": 0 if i % 3 else "", "support_devices": 1 if i == 4 else ""}
        rows.append({"id": row["id"], "image": f"images/{Path(row['image']).name}", "split": "test", **labels,
                     **others})
    mf.write_manifest(rows, out)
    return out


def test_one_of_k_zero_shot_takes_the_closest_class(project):
    _one_of_five(project)
    result = CliRunner().invoke(app, ["zeroshot", "--task", "chexpert-5x200", "--set",
                                      "zeroshot.datasets.chexpert-5x200=datasets/cx5"])
    assert result.exit_code == 0, result.output
    m = json.loads((project / "metrics" / "zeroshot" / "chexpert-5x200_g2d.json").read_text())
    assert m["metric"] == "accuracy" and m["images"] == 10 and len(m["classes"]) == 5
    assert m["test"]["chance_accuracy"] == pytest.approx(0.2)


def _fine_tuned_folder(project: Path) -> Path:
    folder = project / "models" / "not-an-encoder"
    shutil.copytree(project / "models" / "pretrain", folder, dirs_exist_ok=True)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    (folder / "config.yaml").write_text(yaml.safe_dump({**config, "kind": "segmentation", "task": "siim-seg"}))
    return folder


@pytest.mark.parametrize(("command", "args", "message"), [
    ("zeroshot", ["--task", "chexpert-5x200"], "set zeroshot.datasets.chexpert-5x200 to its folder"),
    ("ground", ["--task", "ms-cxr"], "set zeroshot.datasets.ms-cxr to its folder"),
    ("zeroshot", ["--task", "siim-seg"], "unknown zeroshot task 'siim-seg': tasks are synthcxr, siim, rsna"),
    ("ground", ["--task", "chestxray14"], "unknown ground task 'chestxray14': tasks are synthcxr, siim, rsna, ms-cxr"),
    ("zeroshot", ["--model", "random"], "a random network has no trained text tower"),
    ("ground", ["--model", "g2d-encoder@champion"], "model 'g2d-encoder' has no alias 'champion'"),
    ("zeroshot", ["--model", "models/not-an-encoder"], "a fine-tuned segmentation model (task siim-seg), not a "
                                                       "pre-trained encoder"),
    ("ground", ["--model", "global"], "models/pretrain-global (finetune.inits.global) does not exist"),
    ("ground", ["--seed", "43"], "--seed needs --variant"),
    ("ground", ["--variant", "nope"], "--variant 'nope' is not a name in study.ablations (g2d, shuffled-masks)"),
    ("ground", ["--variant", "shuffled-masks", "--seed", "7"], "--variant shuffled-masks: "
     "models/ablations/shuffled-masks-seed7 does not exist; pre-train it first (g2d pretrain --variant shuffled-masks "
     "--seed 7)"),
])
def test_zeroshot_and_ground_bad_inputs(project, command, args, message):
    _fine_tuned_folder(project)
    result = CliRunner().invoke(app, [command, *args])
    assert result.exit_code == 1
    assert message in result.output


def test_matrix_encoders_must_be_pre_trained():
    with pytest.raises(ConfigError, match=r"matrix.encoders \['random'\] name a random init"):
        load_params(Path(__file__).resolve().parents[1] / "params.yaml", ['matrix.encoders=["g2d", "random"]'])


def test_no_finding_columns_are_not_prompted(tmp_path):
    from g2d.pipeline.zeroshot import tasks as zeroshot_tasks

    df = pd.DataFrame({"id": ["a"], "image": ["a.png"], "No Finding": [1], "Effusion": [0], "normal": [0]})
    found, excluded = zeroshot_tasks.classes(df, tmp_path)
    assert found == ("Effusion",) and excluded == ["No Finding", "normal"]


def test_report_table_2_uses_each_task_s_headline_metric():
    from g2d.pipeline.study import report

    zs = [{"task": "chexpert-5x200", "model": "g2d", "metric": "accuracy", "score": 0.4, "file": "c_g2d.json",
           "test": {"accuracy": 0.4, "auc": 0.7, "f1": 0.3, "chance_accuracy": 0.2}}]
    gr = [{"task": "synthcxr", "model": "g2d", "metric": None, "score": None, "file": "synthcxr_g2d.json",
           "test": {"pointing": 0.1, "pointing_chance": 0.05, "pointing_body": 0.2, "pointing_body_chance": 0.08,
                    "iou": 0.06, "dice": 0.09, "cnr": 0.7, "cnr_unrelated": 0.5}}]
    lines = "\n".join(report.zeroshot_tables(zs, gr, ["global", "g2d"]))
    assert "| G2D | 40.0 | 30.0 |" in lines and "| 20.0 |" in lines  # accuracy beside its chance, not the AUC
    assert "| G2D | 10.0 | 20.0 | 6.0 | 9.0 | 0.70 (0.50) |" in lines and "| Chance | 5.0 | 8.0 | – | – | – |" in lines


def test_in_memory_images_are_scaled_like_files(project, tmp_path):
    img16 = (_gradient().astype(np.uint16) * 257)  # 16-bit, full range
    Image.fromarray(img16).save(tmp_path / "x16.png")
    from g2d.inference import as_image

    from_file = as_image(tmp_path / "x16.png")
    with Image.open(tmp_path / "x16.png") as im:
        assert np.allclose(as_image(im), from_file, atol=1e-6)
    assert np.allclose(as_image(img16), from_file, atol=1e-6)
    assert np.allclose(as_image(_gradient()), from_file, atol=1e-6)  # uint8 / 255 = uint16 / 65535 here
    with pytest.raises(DataError, match="must hold finite values in \\[0, 1\\]; pass integer pixels"):
        as_image(img16.astype(np.float32))


@pytest.mark.parametrize(("args", "message"), [
    (["--box", "10,5,400,30"], "--box 10,5,400,30: not inside the image (70 x 50 px)"),
    (["--out", "heat.txt"], "--out heat.txt: name a figure file ending in .png"),
])
def test_explain_box_and_out_are_checked(project, tmp_path, args, message):
    Image.fromarray(_gradient()).save(tmp_path / "x.png")
    result = CliRunner().invoke(app, ["explain", str(tmp_path / "x.png"), "--prompt", "opacity", *args])
    assert result.exit_code == 1 and message in result.output


def _opacity_variant(project: Path, name: str, keep_splits: tuple[str, ...], drop: tuple[str, ...]) -> Path:
    """The tiny opacity set restricted to some splits and without some columns (an RSNA-like import)."""
    src = project / "datasets" / "synthcxr" / "opacity"
    out = project / "datasets" / name
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src, out)
    df = mf.read_manifest(out)
    df = df[df["split"].isin(keep_splits)].drop(columns=list(drop))
    (out / "dataset.json").unlink()
    shutil.rmtree(out / "fractions", ignore_errors=True)
    mf.write_manifest(df, out)
    return out


def test_ground_on_boxes_only_and_without_val(project):
    _opacity_variant(project, "rsna-boxes", ("test",), ("findings", "mask"))
    result = CliRunner().invoke(app, ["ground", "--task", "rsna", "--set",
                                      "zeroshot.datasets.rsna=datasets/rsna-boxes"])
    assert result.exit_code == 0, result.output
    m = json.loads((project / "metrics" / "grounding" / "rsna_g2d.json").read_text())
    assert m["threshold_chosen_on"] == "no val finding to choose on: the middle candidate"
    assert m["test"]["targets"] >= 1 and "cnr_unrelated" in m["test"]
    assert "threshold chosen on no val finding" in result.output


def test_ground_reversed_box_names_the_row(project):
    out = _opacity_variant(project, "rsna-bad", ("val", "test"), ("findings", "mask"))
    df = mf.read_manifest(out)
    row = df.index[df["boxes"] != "[]"][0]
    df.loc[row, "boxes"] = '[[40,40,20,50,"opacity"]]'
    mf.write_manifest(df, out)
    result = CliRunner().invoke(app, ["ground", "--task", "rsna", "--set", "zeroshot.datasets.rsna=datasets/rsna-bad"])
    assert result.exit_code == 1
    assert f"row {df.loc[row, 'id']}: box [40, 40, 20, 50, 'opacity'] needs x1 > x0 and y1 > y0" in result.output


def test_a_phrase_with_several_boxes_is_one_grounding_target():
    a, b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    a[0, 0], b[3, 3] = True, True
    merged = grounding._merge_same_phrase([("small effusion", "effusion", a), ("cardiomegaly", "cardiomegaly", a),
                                           ("small effusion", "effusion", b)])
    assert [t[0] for t in merged] == ["small effusion", "cardiomegaly"]
    assert merged[0][2].sum() == 2 and merged[1][2].sum() == 1
