"""The `zeroshot` stage: `g2d zeroshot --model M --task T` classifies images with prompts alone (paper
Table 2a). Per class, the image's global embedding is compared with '<finding>' and 'no <finding>'; the
score is the difference of the two cosine similarities, positive means "has it". One-of-K datasets
(CheXpert 5x200) take the class whose positive prompt is closest.

Writes `metrics/zeroshot/<task>_<model>.json` and logs an MLflow run (`g2d-zeroshot`).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from g2d import tracking
from g2d.config import Params, resolve_path
from g2d.data import labelled
from g2d.data import manifest as mf
from g2d.data.tasks import TaskSpec
from g2d.pipeline import metrics_files, runtime
from g2d.pipeline.downstream_metrics import accuracy_scores, auc_scores
from g2d.pipeline.zeroshot import encoders, similarity
from g2d.pipeline.zeroshot import tasks as zeroshot_tasks
from g2d.progress import Reporter, silent


@dataclass
class ZeroshotOutcome:
    metrics: dict
    metrics_path: Path
    run_id: str


def binary_scores(scores: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...]) -> dict[str, float]:
    """Per class and macro: AUC of the score, and F1 / accuracy of `score > 0` (the positive prompt is the
    closer one), on the rows whose label is known; with the baselines a reader needs beside them."""
    from monai.metrics import compute_confusion_matrix_metric, get_confusion_matrix

    out = auc_scores(scores, labels, classes)
    f1s, chance_f1, accs, majority = [], [], [], []
    for c, name in enumerate(classes):
        known = ~torch.isnan(labels[:, c])
        y, pred = labels[known, c], (scores[known, c] > 0).float()
        if not len(y):
            out[f"f1_{name}"] = out[f"accuracy_{name}"] = math.nan
            continue
        cm = get_confusion_matrix(pred[:, None], y[:, None], include_background=True).sum(0, keepdim=True)
        f1 = float(compute_confusion_matrix_metric("f1 score", cm))
        acc = float(compute_confusion_matrix_metric("accuracy", cm))
        prevalence = float(y.mean())
        out[f"f1_{name}"], out[f"accuracy_{name}"], out[f"positives_{name}"] = f1, acc, int(y.sum())
        accs.append(acc)
        majority.append(max(prevalence, 1 - prevalence))
        if not math.isnan(f1):  # no positive and none called: F1 undefined, left out of both means
            f1s.append(f1)
            chance_f1.append(2 * prevalence / (1 + prevalence))
    out["f1"] = float(np.mean(f1s)) if f1s else math.nan
    out["f1_classes_undefined"] = len(classes) - len(f1s)
    out["accuracy"] = float(np.mean(accs)) if accs else math.nan
    out["chance_auc"] = 0.5
    out["chance_accuracy_majority"] = float(np.mean(majority)) if majority else math.nan
    out["chance_f1_all_positive"] = float(np.mean(chance_f1)) if chance_f1 else math.nan
    return out


def multiclass_scores(scores: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...]) -> dict[str, float]:
    """One-of-K: accuracy of the closest positive prompt, macro F1, one-vs-rest macro AUC."""
    from monai.metrics import compute_confusion_matrix_metric, get_confusion_matrix

    out = accuracy_scores(scores, labels, classes)
    pred = torch.nn.functional.one_hot(scores.argmax(1), len(classes)).float()
    cm = get_confusion_matrix(pred, labels.float(), include_background=True).sum(0, keepdim=True)
    per_class = compute_confusion_matrix_metric("f1 score", cm)[0]
    for name, f1 in zip(classes, per_class.tolist(), strict=True):
        out[f"f1_{name}"] = f1
    out["f1"] = float(np.nanmean(per_class.numpy()))
    out["chance_accuracy"] = float(labels.mean(0).max())  # always the most frequent class
    return out


def metrics_path(params: Params, task: str, label: str) -> Path:
    return resolve_path(tracking.project_root(), params.paths.metrics) / "zeroshot" / f"{task}_{label}.json"


def run(params: Params, model: str, task: str | None = None, reporter: Reporter = silent) -> ZeroshotOutcome:
    cfg = params.zeroshot
    source = zeroshot_tasks.get(task or cfg.task, zeroshot_tasks.ZEROSHOT, "zeroshot")
    root = tracking.project_root()
    folder = zeroshot_tasks.dataset_folder(source, params, root)
    df = mf.read_manifest(folder)
    classes, excluded = zeroshot_tasks.classes(df, folder, source.classes)
    pre = encoders.load(model, params, root)
    dev = runtime.device()
    pre.model.to(dev)

    spec = TaskSpec(f"zeroshot-{source.name}", "classification", classes, source.synthcxr, source.paper,
                    multiclass=source.multiclass)
    n = int((df["split"] == cfg.split).sum()) if "split" in df else 0
    data = labelled.load_split(folder, df, cfg.split, spec, pre.image_size,
                               progress=reporter.task(f"load {source.name} {cfg.split} images", n))
    prompts = similarity.class_prompts(list(classes), cfg)
    positive, negative = similarity.embed_class_prompts(pre.model, pre.tokenizer, prompts)
    advance = reporter.task(f"embed {len(data)} images with {pre.name}", len(data))
    images = similarity.embed_images(pre.model, data.images, cfg.batch_size, maps=False)
    advance(len(data))
    if source.multiclass:
        scores = images.pooled @ positive.T
        result = multiclass_scores(scores, data.labels, classes)
        headline = "accuracy"
    else:
        scores = images.pooled @ positive.T - images.pooled @ negative.T
        result = binary_scores(scores, data.labels, classes)
        headline = "auc"

    info = mf.read_info(folder)
    data_hash = info.get("sha256") or mf.dataset_hash(folder)
    metrics = {"task": source.name, "paper": source.paper, "model": pre.name, "model_source": pre.source,
               "model_sha256": pre.sha256, "model_dense": pre.config.get("dense"), "split": cfg.split,
               "images": len(data), "classes": list(classes), "excluded_columns": excluded, "metric": headline,
               "score": result.get(headline),
               "test": result, "prompts": {p.name: {"positive": list(p.positive), "negative": list(p.negative)}
                                           for p in prompts},
               "ensemble": cfg.ensemble, "dropped": data.dropped, "data_hash": data_hash}
    out_path = metrics_path(params, source.name, pre.label)
    tags = {"g2d.task": source.name, "g2d.model": pre.source, "g2d.model_sha256": pre.sha256,
            **mf.protocol_tags(info.get("protocol"))}
    with tracking.start_run("zeroshot", config={"zeroshot": cfg.model_dump(mode="json"), "task": source.name,
                                                "model": pre.source, "model_config": pre.config},
                            data_hash=data_hash, tags=tags, uri=params.tracking.uri) as tr:
        tr.log_dataset(f"{source.name}-{folder.name}", source=str(folder / mf.MANIFEST), digest=data_hash,
                       context="evaluation", profile={cfg.split: len(data)})
        tr.log_metrics(metrics_files.numbers(result, f"{cfg.split}/"))
        metrics_files.write(out_path, metrics)
        tr.log_artifact(out_path)
        with tempfile.TemporaryDirectory(prefix="g2d-zeroshot-") as tmp:
            tr.log_artifact(_figure(result, classes, headline, f"{source.name}, {pre.name}",
                                    Path(tmp) / f"{out_path.stem}.png"), "figures")
    return ZeroshotOutcome(metrics, out_path, tr.run_id)


def _figure(result: dict, classes: tuple[str, ...], headline: str, title: str, path: Path) -> Path:
    """Per-class AUC (or F1 for one-of-K) against chance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from g2d.pipeline.figures import save_figure

    key = "auc" if headline == "auc" else "f1"
    values = [result.get(f"{key}_{c}", math.nan) for c in classes]
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(classes), 3.2))
    ax.bar(range(len(classes)), [0 if math.isnan(v) else v for v in values], color="tab:blue")
    if key == "auc":
        ax.axhline(0.5, color="grey", ls="--", lw=1, label="chance")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"zero-shot {key.upper()}")
    ax.set_title(f"{title}: macro {headline} {result.get(headline, math.nan):.3f}", fontsize=9)
    return save_figure(fig, path)
