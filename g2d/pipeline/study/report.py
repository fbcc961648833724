"""The `report` stage: every `metrics/finetune/*.json` gathered into `reports/results.md`, laid out like
the paper's Table 1 (segmentation Dice and detection mAP) and Table 4 (linear classification), with the
zero-shot classification and grounding results (`metrics/zeroshot`, `metrics/grounding`, Table 2) beside
their chance levels, and the learning curves (test metric against label fraction, one line per init: the
mean over seeds with its interval band, drawn by g2d/pipeline/study/comparisons.py), as DVC plots and MLflow
artifacts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from g2d import tracking
from g2d.config import Params, resolve_path, to_dict
from g2d.data import tasks
from g2d.errors import DataError
from g2d.pipeline import metrics_files
from g2d.pipeline.study import comparisons, grounding_compare
from g2d.pipeline.study.comparisons import DICE_NOTE, INIT_TITLES, METRIC_TITLES

REPORTS = "reports"
BASELINES_FIRST = ("random", "global", "g2d")  # the paper's tables: baselines on top, the method last


@dataclass
class ReportOutcome:
    cells: int
    markdown: Path
    figure: Path | None  # the learning curves
    run_id: str
    study: Path


def _order(values, preferred) -> list:
    return [v for v in preferred if v in values] + sorted(v for v in values if v not in preferred)


def _cell(score) -> str:
    return "–" if score is None or (isinstance(score, float) and math.isnan(score)) else f"{100 * score:.1f}"


def table(rows: list[dict], task_names: list[str], inits: list[str], fracs: list[float],
          key: str = "score", title: str | None = None) -> list[str]:
    """One markdown table: a row per init, a column per task x fraction (values x 100, best in bold)."""
    index = {(r["task"], r["frac"], r["init"]): r.get(key) for r in rows}
    head = ["Method"] + [f"{t} {title or METRIC_TITLES.get(tasks.get(t).metric, '')} {f:.0%}"
                         for t in task_names for f in fracs]
    best = {}
    for t in task_names:
        for f in fracs:
            vals = [index.get((t, f, i)) for i in inits]
            vals = [v for v in vals if v is not None and not math.isnan(v)]
            best[t, f] = max(vals) if vals else None
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i in inits:
        cells = []
        for t in task_names:
            for f in fracs:
                v = index.get((t, f, i))
                text = _cell(v)
                cells.append(f"**{text}**" if v is not None and v == best[t, f] and len(inits) > 1 else text)
        lines.append(f"| {INIT_TITLES.get(i, i)} | " + " | ".join(cells) + " |")
    return lines


def _plain(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def zeroshot_tables(zs: list[dict], gr: list[dict], models: list[str], paired: Sequence[str] = ()) -> list[str]:
    """Table 2: zero-shot classification (a) and grounding (b), one row per encoder plus chance; `paired`:
    sentences comparing two encoders' grounding phrase by phrase (study/grounding_compare.py)."""
    out = []
    if zs:
        task_names = _order({r["task"] for r in zs}, [])
        head = ["Method"] + [f"{t} {c}" for t in task_names for c in ("AUC / ACC", "F1")]
        out += ["## Table 2a: zero-shot classification ('<finding>' vs 'no <finding>' prompts, no labels)", "",
                "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        index = {(r["task"], r["model"]): r["test"] for r in zs}
        metric = {r["task"]: r["metric"] for r in zs}
        for m in _order({r["model"] for r in zs}, models):
            cells = []
            for t in task_names:
                test = index.get((t, m), {})
                cells += [_cell(test.get(metric[t])), _cell(test.get("f1"))]
            out.append(f"| {INIT_TITLES.get(m, m)} | " + " | ".join(cells) + " |")
        chance = []
        for t in task_names:
            test = next(r["test"] for r in zs if r["task"] == t)
            chance += [_cell(test.get(f"chance_{metric[t]}")), _cell(test.get("chance_f1_all_positive"))]
        out += ["| Chance (AUC 0.5, or the most frequent class; F1 of calling every image positive) | "
                + " | ".join(chance) + " |", ""]
    if gr:
        task_names = _order({r["task"] for r in gr}, [])
        head = ["Method"] + [f"{t} {c}" for t in task_names
                             for c in ("pointing", "pointing in body", "IoU", "Dice", "CNR (unrelated map)")]
        out += ["## Table 2b: zero-shot grounding (phrase heat maps against each finding's own mask)", "",
                "Pointing game (over the image, and with only the body competing), IoU and Dice x 100 (binarised "
                "at the threshold chosen on val), CNR as is. Chance: a uniformly random point (the finding's "
                "share of the image, or of the body) for pointing; for CNR, in brackets, the same encoder's masks "
                "scored against the heat map of another image (a map unrelated to the finding).", "",
                "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        index = {(r["task"], r["model"]): r["test"] for r in gr}
        for m in _order({r["model"] for r in gr}, models):
            cells = []
            for t in task_names:
                test = index.get((t, m), {})
                cells += [_cell(test.get("pointing")), _cell(test.get("pointing_body")), _cell(test.get("iou")),
                          _cell(test.get("dice")), f"{_plain(test.get('cnr'))} ({_plain(test.get('cnr_unrelated'))})"]
            out.append(f"| {INIT_TITLES.get(m, m)} | " + " | ".join(cells) + " |")
        chance = []
        for t in task_names:
            test = next(r["test"] for r in gr if r["task"] == t)
            chance += [_cell(test.get("pointing_chance")), _cell(test.get("pointing_body_chance")), "–", "–", "–"]
        out += ["| Chance | " + " | ".join(chance) + " |", ""]
        out += [f"- {p}" for p in paired] + ([""] if paired else [])
        out += ["Report pages (examples: image, phrase, heat map, truth): " +
                ", ".join(f"[{r['task']} {r['model']}](grounding/{Path(r['file']).stem}.png)" for r in gr), ""]
    return out


def grounding_pairs(params: Params, folder: Path, models: list[str]) -> list[str]:
    """G2D against global-only on the grounding task, phrase by phrase (when both were grounded)."""
    if not {"g2d", "global"} <= set(models):
        return []
    runs, _ = grounding_compare.read(folder)
    runs = [r for r in runs if r.task == params.zeroshot.grounding.task]
    a, b = [r for r in runs if r.model == "g2d"], [r for r in runs if r.model == "global"]
    if not (a and b):
        return []
    s, names = params.study, ("G2D", "global-only")
    return [grounding_compare.line(grounding_compare.compare(a, b, names, score, confidence=s.confidence,
                                                             alpha=s.alpha, n_resamples=s.resamples), names, score)
            for score in grounding_compare.SCORES]


def in_matrix(run: metrics_files.Result, params: Params) -> bool:
    m = params.matrix
    return (run.task in m.tasks and run.frac in m.fractions and run.row in m.inits and run.seed in m.seeds
            and "_seed" in run.file)


def mean_over_seeds(runs: list[metrics_files.Result]) -> list[dict]:
    """One row per task x fraction x init: the mean of its seeds' scores (reports/study.md has the spread)."""
    groups: dict[tuple, list[metrics_files.Result]] = {}
    for r in runs:
        groups.setdefault((r.task, r.frac, r.row), []).append(r)
    mean = metrics_files.seed_mean
    return [{"task": task, "frac": frac, "init": init, "score": mean(r.score for r in mine), "seeds": len(mine),
             "dice_positive": mean(r.dice_positive for r in mine), "dice_pooled": mean(r.dice_pooled for r in mine)}
            for (task, frac, init), mine in groups.items()]


def markdown(rows: list[dict], inits: list[str], others: list = (), zeroshot: list[str] = ()) -> str:
    present = {r["task"] for r in rows}
    fracs = sorted({r["frac"] for r in rows})
    inits = _order({r["init"] for r in rows}, inits)
    dense = [t for t in tasks.TASKS if t in present and tasks.get(t).kind != "classification"]
    cls = [t for t in tasks.TASKS if t in present and tasks.get(t).kind == "classification"]
    out = ["# Fine-tuning results", "",
           "Test metrics x 100 of the weights of the best val epoch, by label fraction of the train split; the best "
           "value of each column in bold. Generated by `g2d report` from `metrics/finetune/`; each cell is the "
           f"mean over its seeds' runs (up to {max((r.get('seeds', 1) for r in rows), default=1)}): "
           "[study.md](study.md) gives their spread, intervals and paired tests.", ""]
    if dense:
        out += ["## Table 1: segmentation (Dice per image) and detection (mAP over IoU 0.4:0.05:0.75)", ""]
        out += table(rows, dense, inits, fracs) + [""]
    seg = [t for t in dense if tasks.get(t).kind == "segmentation"]
    if seg:
        out += [f"{DICE_NOTE} Dice on the test images that have a finding:", ""]
        out += table(rows, seg, inits, fracs, key="dice_positive", title="Dice+") + [""]
        out += ["Pooled foreground Dice (all test pixels at once: empty images add nothing, so predicting nothing "
                "scores 0):", ""]
        out += table(rows, seg, inits, fracs, key="dice_pooled", title="Pooled Dice") + [""]
    if cls:
        out += ["## Table 4: linear classification (macro AUC; accuracy for one-of-K tasks)", ""]
        out += table(rows, cls, inits, fracs) + [""]
    out += list(zeroshot)
    out += ["## Tasks", ""]
    for t in dense + cls:
        spec = tasks.get(t)
        default = f"SynthCXR `{spec.synthcxr}` set" if spec.synthcxr else "an imported dataset"
        out.append(f"- `{t}`: {spec.paper} (paper); here {default} unless `finetune.datasets.{t}` is set.")
    out += ["", "Inits: " + "; ".join(f"`{i}` = {INIT_TITLES.get(i, i)}" for i in inits) + ".",
            "Protocols: segmentation and detection keep the pre-trained encoder frozen (params "
            "`finetune.*.freeze_encoder`); the linear probe always does. The paper detects with YOLOv3; g2d uses "
            "torchvision's RetinaNet with an FPN on the same encoder.", ""]
    if others:
        out += ["## Other runs in metrics/ (outside params.matrix, not in the tables)", ""]
        out += [f"- `{r.file}`: {r.task} {r.frac:g} init {r.row} seed {r.seed}: {r.metric} "
                f"{_cell(r.score)}" if isinstance(r, metrics_files.Result) else
                f"- `{r['file']}`: {r['task']}, model {r['model']}: {r['metric'] or 'pointing'} "
                f"{_cell(r['score'] if r['metric'] else r['test'].get('pointing'))}" for r in others] + [""]
    return "\n".join(out)


def curves(rows: list[dict], inits: list[str], out_dir: Path) -> list[Path]:
    """Per task a CSV with one column per init (DVC plots read these)."""
    written = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for t in _order({r["task"] for r in rows}, list(tasks.TASKS)):
        mine = [r for r in rows if r["task"] == t]
        names = _order({r["init"] for r in mine} | set(BASELINES_FIRST), inits)  # the columns dvc.yaml plots
        lines = [",".join(["frac", *names])]
        for f in sorted({r["frac"] for r in mine}):
            vals = {r["init"]: r["score"] for r in mine if r["frac"] == f}
            lines.append(",".join([f"{f:g}"] + ["" if vals.get(i) is None else f"{vals[i]:.5f}" for i in names]))
        path = out_dir / f"{t}.csv"
        path.write_text("\n".join(lines) + "\n")
        written.append(path)
    return written


def run(params: Params) -> ReportOutcome:
    root = tracking.project_root()
    source = resolve_path(root, params.paths.metrics) / "finetune"
    found = metrics_files.read_cells(source)
    rows = mean_over_seeds([r for r in found if in_matrix(r, params)])
    others = [r for r in found if not in_matrix(r, params)]
    if not rows:
        raise DataError(f"{source}: no fine-tuning metrics of params.matrix to report ({len(others)} others); run "
                        "`dvc repro` or `g2d train` first")
    out = root / REPORTS
    inits = [i for i in BASELINES_FIRST if i in params.matrix.inits] + [
        i for i in params.matrix.inits if i not in BASELINES_FIRST]
    md = out / "results.md"
    out.mkdir(parents=True, exist_ok=True)
    metrics = resolve_path(root, params.paths.metrics)
    models = [m for m in BASELINES_FIRST if m in params.matrix.encoders] + [
        m for m in params.matrix.encoders if m not in BASELINES_FIRST]
    zs, gr = metrics_files.read_encoder_results(metrics / "zeroshot"), metrics_files.read_encoder_results(
        metrics / "grounding")
    zs_in = [r for r in zs if r["model"] in models and r["task"] == params.zeroshot.task]
    gr_in = [r for r in gr if r["model"] in models and r["task"] == params.zeroshot.grounding.task]
    extra = [r for r in zs + gr if r not in zs_in and r not in gr_in]
    paired = grounding_pairs(params, metrics / "grounding", models)
    md.write_text(markdown(rows, inits, others + extra, zeroshot_tables(zs_in, gr_in, models, paired)))
    csvs = curves(rows, inits, out / "curves")
    studied = comparisons.write(params, metrics, out)
    with tracking.start_run("report", config=to_dict(params), uri=params.tracking.uri,
                            tags={"g2d.cells": str(len(rows))}) as tr:
        for path in (md, *csvs, studied.markdown, *studied.figures):
            tr.log_artifact(path, (Path("report") / path.parent.relative_to(out)).as_posix())  # as on disk
        tr.log_metrics({f"orderings/{k.replace(' ', '_').replace(':', '')}": v
                        for k, v in comparisons.tally(studied.checks).items()})
    return ReportOutcome(len(rows), md, studied.curves, tr.run_id, studied.markdown)
