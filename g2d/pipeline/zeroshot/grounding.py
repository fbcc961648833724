"""The `ground` stage: `g2d ground --model M --task T` localises phrases without any box or mask
supervision (paper Table 2b). The phrase's projected embedding is compared with every location of the
image's projected last feature map; the upsampled cosine similarities are a heat map, scored against
the phrase's own region (zeroshot/grounding_metrics.py); pointing is also scored with only the body
(Otsu, as for the pseudo masks) competing, since a map's maximum can sit in the air at the border.

A target is one (image, phrase, region): on SynthCXR every rendered finding with its phrase
('lung opacity in the left lower lung') and its own mask; in a manifest, every entry of the `findings`
column that has a `phrase` (MS-CXR) or a `kind`, and a `mask` or a `box`; without `findings`, the
`mask` of a row with a positive label. The binarising threshold is chosen on val, then test is scored.

Writes `metrics/grounding/<task>_<model>.json` and the report page `reports/grounding/<task>_<model>.png`
(N test examples: image, phrase, heat map, truth), and logs both to MLflow (`g2d-ground`). The metrics keep
every target's pointing hit under its id (`per_target`), so two encoders, or two pre-training seeds of each,
can be compared paired by phrase (reports/results.md, reports/study.md). `g2d ground --variant V [--seed S]`
grounds a study ablation: metrics/ablations/grounding/, reports/grounding/ablations/.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw

from g2d import tracking
from g2d.config import Params, Zeroshot, resolve_path
from g2d.data import labelled
from g2d.data import manifest as mf
from g2d.errors import DataError
from g2d.model.pseudo_mask import otsu_body_mask
from g2d.pipeline import metrics_files, runtime
from g2d.pipeline.figures import grounding_grid
from g2d.pipeline.pretrain import ablations
from g2d.pipeline.zeroshot import encoders, grounding_metrics, similarity
from g2d.pipeline.zeroshot import tasks as zeroshot_tasks
from g2d.progress import Advance, Reporter, silent

REPORTS = "reports/grounding"


@dataclass
class Targets:
    images: torch.Tensor  # (N, 1, S, S) in [0, 1], the images that have at least one target
    image_ids: list[str]
    image_index: list[int] = field(default_factory=list)  # per target, into images
    phrases: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)  # the finding kind (or the phrase) for per-kind figures
    truth: list[torch.Tensor] = field(default_factory=list)  # per target (S, S) bool
    dropped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.phrases)


@dataclass
class GroundOutcome:
    metrics: dict
    metrics_path: Path
    page: Path
    run_id: str


def _box_mask(box, scale_x: float, scale_y: float, size: int, where: str) -> np.ndarray:
    """A filled box at the model size; a box thinner than a pixel there still covers one pixel."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box[:4])
    except (TypeError, ValueError):
        raise DataError(f"{where}: box {box} is not [x0, y0, x1, y1, ...] in pixels") from None
    if not (x1 > x0 and y1 > y0):
        raise DataError(f"{where}: box {box} needs x1 > x0 and y1 > y0 (x0, y0 is the top-left corner)")
    x0, y0 = x0 * scale_x, y0 * scale_y
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).rectangle([x0, y0, max(x0, x1 * scale_x - 1), max(y0, y1 * scale_y - 1)], fill=255)
    return np.asarray(canvas) > 127


def _mask(folder: Path, rel: str, where: str, size: int) -> np.ndarray:
    return labelled.open_resized(folder, rel, where, size, Image.Resampling.NEAREST)[0] > 0  # 0/1 or 0/255


def _row_targets(row: pd.Series, folder: Path, where: str, size: int, cfg: Zeroshot, label_cols: list[str],
                 dropped: Counter) -> tuple[list[tuple[str, str, np.ndarray]], np.ndarray | None]:
    """(phrase, kind, truth mask at `size`) for each groundable finding of one manifest row: the `findings`
    entries; else the boxes of the `boxes` column (their label as the phrase); else the row's `mask`.
    Also the image at `size` when boxes needed its size (so it is read once)."""
    row_mask = _mask(folder, row["mask"], where, size) if isinstance(row.get("mask"), str) and row["mask"] else None
    findings = _json_list(row, "findings", where)
    boxes = [] if findings else _json_list(row, "boxes", where)
    if not findings and not boxes:
        positive = [c for c in label_cols if row.get(c) == 1]
        if row_mask is not None and row_mask.any() and positive:
            return [(similarity.phrase(positive[0], cfg), positive[0], row_mask)], None
        return [], None
    image, width, height = labelled.open_resized(folder, row["image"], where, size, Image.Resampling.BILINEAR)
    scale = (size / width, size / height, size, where)
    out = []
    for f in findings:
        if not (f.get("phrase") or f.get("kind")):
            dropped["findings with neither a phrase nor a kind"] += 1
            continue
        text = f.get("phrase") or similarity.finding_phrase(f, cfg)
        if f.get("mask"):
            truth = _mask(folder, f["mask"], where, size)
        elif f.get("box"):
            truth = _box_mask(f["box"], *scale)
            if row_mask is not None and (truth & row_mask).any():
                truth &= row_mask  # the finding's own part of the row's mask
        else:
            dropped["findings with neither a mask nor a box"] += 1
            continue
        out.append((text, f.get("kind") or text, truth))
    for box in boxes:
        label = str(box[4]) if len(box) > 4 else (label_cols[0] if len(label_cols) == 1 else None)
        if label is None:
            raise DataError(f"{where}: box {box} has no label to phrase (expected [x0, y0, x1, y1, label])")
        out.append((similarity.phrase(label, cfg), label, _box_mask(box, *scale)))
    return _merge_same_phrase(out), image


def _merge_same_phrase(targets: list[tuple[str, str, np.ndarray]]) -> list[tuple[str, str, np.ndarray]]:
    """One target per phrase and image: a phrase with several boxes (MS-CXR, RSNA) is one region, as
    MS-CXR's own evaluation scores it; the prompt cannot say which of its boxes it means."""
    merged: dict[tuple[str, str], np.ndarray] = {}
    for text, kind, truth in targets:
        key = (text, kind)
        merged[key] = merged[key] | truth if key in merged else truth
    return [(text, kind, truth) for (text, kind), truth in merged.items()]


def _json_list(row: pd.Series, column: str, where: str) -> list:
    raw = row.get(column)
    if not isinstance(raw, str) or not raw.strip():
        return []
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: {column} is not JSON ({e})") from None


def load_targets(folder: Path, df: pd.DataFrame, split: str, size: int, cfg: Zeroshot,
                 progress: Advance | None = None) -> Targets:
    rows = df[df["split"] == split] if "split" in df else df.iloc[:0]
    rows = rows.sort_values("id").reset_index(drop=True)
    if not {"findings", "boxes", "mask"} & set(rows.columns):
        raise DataError(f"{folder / mf.MANIFEST}: grounding needs a findings column (phrases with a mask or box), "
                        f"a boxes column or a mask column; columns are {list(df.columns)}")
    label_cols = mf.label_columns(df)
    images, ids = [], []
    out = Targets(torch.empty(0), [])
    for _, row in rows.iterrows():
        where = f"{folder / mf.MANIFEST} row {row['id']}"
        found, image = _row_targets(row, folder, where, size, cfg, label_cols, out.dropped)
        kept = [t for t in found if t[2].any()]
        if len(kept) < len(found):
            out.dropped["findings whose region is empty at the model size"] += len(found) - len(kept)
        if not found:
            out.dropped["images without a finding to ground"] += 1
        if kept:
            if image is None:
                image = labelled.open_resized(folder, row["image"], where, size, Image.Resampling.BILINEAR)[0]
            images.append(image)
            ids.append(row["id"])
            for text, kind, truth in kept:
                out.image_index.append(len(images) - 1)
                out.phrases.append(text)
                out.kinds.append(kind)
                out.truth.append(torch.from_numpy(truth))
        if progress:
            progress(1)
    out.images = torch.from_numpy(np.stack(images)).float().div_(255).unsqueeze(1) if images else \
        torch.zeros(0, 1, size, size)
    out.image_ids = ids
    return out


@torch.no_grad()
def heat_maps(pre: encoders.Pretrained, targets: Targets, batch_size: int) -> torch.Tensor:
    """(T, S, S) cosine similarity of each target's phrase with its image's locations."""
    if not len(targets):
        return torch.zeros(0, *targets.images.shape[-2:])
    unique = sorted(set(targets.phrases))
    texts = similarity.embed_texts(pre.model, pre.tokenizer, unique)
    text_of = {p: i for i, p in enumerate(unique)}
    maps = similarity.embed_images(pre.model, targets.images, batch_size).maps
    index = torch.tensor(targets.image_index)
    chosen = texts[torch.tensor([text_of[p] for p in targets.phrases])]
    sim = (maps[index] * chosen[:, :, None, None]).sum(1, keepdim=True)
    return torch.nn.functional.interpolate(sim, size=targets.images.shape[-2:], mode="bilinear",
                                           align_corners=False)[:, 0]


def score(heat: torch.Tensor, truth: torch.Tensor, threshold: float,
          body: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-target pointing hit and its chance (over the image, and over the body when given), IoU and
    Dice at `threshold`, and CNR."""
    iou, dice = grounding_metrics.overlap(similarity.scale01(heat), truth, threshold)
    out = {"pointing": grounding_metrics.pointing_hits(heat, truth).float(),
           "pointing_chance": grounding_metrics.pointing_chance(truth), "iou": iou, "dice": dice,
           "cnr": grounding_metrics.cnr(heat, truth)}
    if body is not None:
        out["pointing_body"] = grounding_metrics.pointing_hits(heat, truth, body).float()
        out["pointing_body_chance"] = grounding_metrics.pointing_chance(truth, body)
    return out


def metrics_path(params: Params, task: str, label: str, variant: bool = False) -> Path:
    folder = ablations.grounding_folder(params) if variant else f"{params.paths.metrics.rstrip('/')}/grounding"
    return resolve_path(tracking.project_root(), folder) / f"{task}_{label}.json"


def target_ids(targets: Targets) -> list[str]:
    """'<image id>|<phrase>': what pairs one encoder's hit with another's (merged phrases are unique per image)."""
    return [f"{targets.image_ids[i]}|{p}" for i, p in zip(targets.image_index, targets.phrases, strict=True)]


def run(params: Params, model: str, task: str | None = None, reporter: Reporter = silent,
        variant: str | None = None, seed: int | None = None) -> GroundOutcome:
    """Ground `model`'s phrases; with `variant`, the study ablation's encoder (`seed`: its rerun with that seed)
    instead, written beside the other ablations."""
    cfg = params.zeroshot
    gcfg = cfg.grounding
    source = zeroshot_tasks.get(task or gcfg.task, zeroshot_tasks.GROUNDING, "ground")
    root = tracking.project_root()
    folder = zeroshot_tasks.dataset_folder(source, params, root)
    df = mf.read_manifest(folder)
    if variant is not None:
        model = ablations.model_folder(params, ablations.check_name(params, variant), seed)
        if not resolve_path(root, model).is_dir():
            again = f"g2d pretrain --variant {variant}" + ("" if seed is None else f" --seed {seed}")
            raise encoders.EncoderError(f"--variant {variant}: {model} does not exist; pre-train it first ({again})")
    pre = encoders.load(model, params, root)
    label = pre.label if variant is None else ablations.run_name(params, variant, seed)
    pre.model.to(runtime.device())

    if "split" not in df or not (df["split"] == cfg.split).any():
        raise DataError(f"{folder / mf.MANIFEST}: no rows in split {cfg.split!r} (zeroshot.split) to score")
    splits = {}
    for split in ("val", cfg.split) if cfg.split != "val" else ("val",):
        n = int((df["split"] == split).sum()) if "split" in df else 0
        splits[split] = load_targets(folder, df, split, pre.image_size, cfg,
                                     reporter.task(f"load {source.name} {split} findings", n))
    test = splits[cfg.split]
    if not len(test):
        raise DataError(f"{folder / mf.MANIFEST}: no finding to ground in split {cfg.split!r} "
                        f"({dict(test.dropped)})")
    val = splits["val"]
    if len(val):
        val_heat = heat_maps(pre, val, cfg.batch_size)
        threshold, by_threshold = grounding_metrics.choose_threshold(
            similarity.scale01(val_heat), torch.stack(val.truth), gcfg.thresholds)
        chosen_on = f"val ({len(val)} findings), best mean Dice"
        if cfg.split == "val":
            chosen_on += "; the scored split itself (zeroshot.split = val): an optimistic Dice and IoU"
        if threshold in (gcfg.thresholds[0], gcfg.thresholds[-1]) and len(gcfg.thresholds) > 1:
            chosen_on += "; at the edge of zeroshot.grounding.thresholds: widen them"
    else:
        threshold, by_threshold = gcfg.thresholds[len(gcfg.thresholds) // 2], {}
        chosen_on = "no val finding to choose on: the middle candidate"
    heat = heat_maps(pre, test, cfg.batch_size)
    truth = torch.stack(test.truth)
    body = otsu_body_mask(test.images)[:, 0][torch.tensor(test.image_index)] | truth  # the finding is body
    per_target = score(heat, truth, threshold, body)
    result = {k: float(np.nanmean(v.numpy())) if len(v) else math.nan for k, v in per_target.items()}
    result["cnr_unrelated"] = _unrelated_cnr(heat, truth, test.image_index)
    result["targets"], result["images"] = len(test), len(test.image_ids)
    result["threshold"] = threshold
    by_kind = defaultdict(list)
    for i, kind in enumerate(test.kinds):
        by_kind[kind].append(i)
    kinds = {k: {"targets": len(ix), "pointing": float(per_target["pointing"][ix].mean()),
                 "pointing_chance": float(per_target["pointing_chance"][ix].mean()),
                 "pointing_body": float(per_target["pointing_body"][ix].mean()),
                 "cnr": float(np.nanmean(per_target["cnr"][ix].numpy()))} for k, ix in sorted(by_kind.items())}

    info = mf.read_info(folder)
    data_hash = info.get("sha256") or mf.dataset_hash(folder)
    metrics = {"task": source.name, "paper": source.paper, "model": pre.name, "model_source": pre.source,
               "model_sha256": pre.sha256, "model_dense": pre.config.get("dense"), "model_seed": pre.seed,
               "variant": variant, "split": cfg.split,
               "test": result, "threshold": threshold, "threshold_chosen_on": chosen_on,
               "val_dice_by_threshold": {f"{t:g}": d for t, d in by_threshold.items()}, "by_kind": kinds,
               "dropped": {s: dict(t.dropped) for s, t in splits.items() if t.dropped}, "data_hash": data_hash,
               "per_target": {"id": target_ids(test),
                              "pointing": [int(v) for v in per_target["pointing"].tolist()],
                              "pointing_body": [int(v) for v in per_target["pointing_body"].tolist()]}}
    out_path = metrics_path(params, source.name, label, variant is not None)
    page = resolve_path(root, REPORTS) / ("ablations" if variant is not None else "") / f"{source.name}_{label}.png"
    picks = _examples(len(test), gcfg.examples)
    title = (f"{source.name}, {pre.name}: pointing {result['pointing']:.2f} (chance {result['pointing_chance']:.2f}), "
             f"Dice {result['dice']:.2f} at {threshold:g}, CNR {result['cnr']:.2f}")
    tags = {"g2d.task": source.name, "g2d.model": pre.source, "g2d.model_sha256": pre.sha256,
            **mf.protocol_tags(info.get("protocol"))}
    with tracking.start_run("ground", config={"zeroshot": cfg.model_dump(mode="json"), "task": source.name,
                                              "model": pre.source, "model_config": pre.config},
                            data_hash=data_hash, tags=tags, uri=params.tracking.uri) as tr:
        tr.log_dataset(f"{source.name}-{folder.name}", source=str(folder / mf.MANIFEST), digest=data_hash,
                       context="evaluation", profile={s: len(t) for s, t in splits.items()})
        tr.log_metrics(metrics_files.numbers(result, f"{cfg.split}/"))
        metrics_files.write(out_path, metrics)
        tr.log_artifact(out_path)
        shown = similarity.scale01(heat[picks])
        grounding_grid(test.images[[test.image_index[i] for i in picks]], shown, truth[picks],
                       shown >= threshold, [test.phrases[i] for i in picks],
                       [test.image_ids[test.image_index[i]] for i in picks],
                       [bool(per_target["pointing"][i]) for i in picks], title, page)
        tr.log_artifact(page, "figures")
    return GroundOutcome(metrics, out_path, page, tr.run_id)


def _unrelated_cnr(heat: torch.Tensor, truth: torch.Tensor, image_index: list[int]) -> float:
    """CNR's chance level: each truth scored against the heat map of the first target of the next image.
    CNR takes |contrast|, so a map unrelated to the finding still scores above 0."""
    images = sorted(set(image_index))
    if len(images) < 2:
        return math.nan
    first: dict[int, int] = {}
    for t, i in enumerate(image_index):
        first.setdefault(i, t)
    following = {img: images[(k + 1) % len(images)] for k, img in enumerate(images)}
    other = torch.tensor([first[following[i]] for i in image_index])
    return float(np.nanmean(grounding_metrics.cnr(heat[other], truth).numpy()))


def _examples(n: int, k: int) -> list[int]:
    """k targets spread evenly over the (id-sorted) test targets: the same page every run."""
    return sorted({int(i) for i in np.linspace(0, n - 1, min(k, n))})
