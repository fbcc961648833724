"""`g2d models promote` without arguments (the `promote` stage): the rule in params.promote picks the best
version of a registered encoder, points the alias (`champion`) at it and writes its model card.

The rule reads the registry and the tracking store only, never the DVC workspace, so it ranks every version
anyone trained into the store: a version competes with the fine-tuning runs that started from its weights
(matched by the weights' sha256, the `g2d.init_sha256` tag of `g2d train`), on params.promote.task at
params.promote.frac, one score per seed (the newest finished run of each seed; study variants such as
encoder + decoder transfer are not the plain protocol and do not count). A version needs `min_seeds` seeds.
The winner has the highest mean over seeds; a tie goes to the newer version.

Ranked by the best validation score by default: choosing a model by its test score and then reporting that
test score would overstate it. The card (reports/model_card.md, and the version's description in the
registry) is generated from the winner's registry entry: its files' hashes, data and split hashes, params,
and every fine-tuning result of it in the store with intervals over seeds.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from g2d import tracking
from g2d.config import Params
from g2d.data import manifest as mf
from g2d.data import tasks
from g2d.errors import ConfigError, RegistryError
from g2d.pipeline import metrics_files
from g2d.pipeline.metrics_files import frac_label
from g2d.pipeline.study import stats as study_stats

CARD = Path("reports") / "model_card.md"


@dataclass
class Candidate:
    version: tracking.ModelVersionInfo
    sha256: str
    scores: dict[int, float]  # seed -> the rule's score

    @property
    def mean(self) -> float:
        mean = metrics_files.seed_mean(self.scores.values())
        return math.nan if mean is None else mean


@dataclass
class PromoteOutcome:
    name: str
    alias: str
    version: int
    candidates: list[Candidate]  # those with enough seeds, best first
    card: Path


def _per_seed(runs: list[dict], key: str) -> dict[int, float]:
    """seed -> the metric of the newest finished run of that seed (a rerun replaces an older run)."""
    newest: dict[int, dict] = {}
    for r in runs:
        if "g2d.variant" in r["tags"] or "g2d.seed" not in r["tags"] or key not in r["metrics"]:
            continue
        seed = int(r["tags"]["g2d.seed"])
        if seed not in newest or r["start_time"] > newest[seed]["start_time"]:
            newest[seed] = r
    return {s: float(r["metrics"][key]) for s, r in sorted(newest.items())
            if math.isfinite(float(r["metrics"][key]))}  # a run that never validated (NaN) has no score


def _finetune_runs(sha: str, uri: str | None, **tags: str) -> list[dict]:
    return tracking.find_runs("finetune", {"g2d.init_sha256": sha, **{f"g2d.{k}": v for k, v in tags.items()}},
                              uri=uri)


def candidates(params: Params, tmp: Path) -> list[Candidate]:
    rule, uri = params.promote, params.tracking.uri
    key = "val_best" if rule.score == "val_best" else f"test/{tasks.get(rule.task).metric}"
    out = []
    for info in tracking.model_versions(rule.model, uri=uri):
        weights = tracking.version_file(info, "model.safetensors", tmp / f"v{info.version}", uri=uri)
        sha = mf.file_sha256(weights)
        weights.unlink()
        runs = _finetune_runs(sha, uri, task=rule.task, frac=frac_label(rule.frac))
        out.append(Candidate(info, sha, _per_seed(runs, key)))
    return out


def run(params: Params) -> PromoteOutcome:
    rule = params.promote
    with tempfile.TemporaryDirectory(prefix="g2d-promote-") as tmp:
        found = candidates(params, Path(tmp))
        ranked = [c for c in found if len(c.scores) >= rule.min_seeds]
        if not ranked:
            seen = ", ".join(f"v{c.version.version}: {len(c.scores)} seed(s)" for c in found) or "no versions"
            raise RegistryError(
                f"promote: no version of {rule.model!r} has {rule.min_seeds} seeds of `g2d train --task {rule.task} "
                f"--frac {frac_label(rule.frac)} --init <its weights>` in the store ({seen}); fine-tune it with more "
                "seeds (params matrix.seeds, `dvc repro`) or lower promote.min_seeds")
        ranked.sort(key=lambda c: (c.mean, c.version.version), reverse=True)  # the rule's order, ties: newest
        best = ranked[0]
        text = card(params, best, ranked, Path(tmp))
    # the card is written and attached before the alias moves: a failure leaves the old champion as it was
    path = tracking.project_root() / CARD
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    tracking.describe_version(rule.model, best.version.version, text, uri=params.tracking.uri)
    tracking.promote(rule.model, best.version.version, rule.alias, uri=params.tracking.uri)
    with tracking.start_run("promote", config={"promote": params.promote.model_dump(mode="json")},
                            uri=params.tracking.uri,
                            tags={"g2d.promoted": f"{rule.model}@{rule.alias}={best.version.version}"}) as tr:
        tr.log_artifact(path)
        tr.log_metrics({"winner_mean": best.mean, "candidates": len(ranked)})
    return PromoteOutcome(rule.model, rule.alias, best.version.version, ranked, path)


def _fmt(summary: study_stats.Summary) -> str:
    return study_stats.format_cell(summary, digits=1)


def results_table(params: Params, sha: str) -> list[str]:
    """Every fine-tuning result of these weights in the store: task x fraction, mean ± sd [interval] x 100."""
    runs = [r for r in _finetune_runs(sha, params.tracking.uri) if "g2d.variant" not in r["tags"]]
    cells: dict[tuple[str, float], list[dict]] = {}
    for r in runs:
        cells.setdefault((r["tags"].get("g2d.task", "?"), float(r["tags"].get("g2d.frac", "nan"))), []).append(r)
    if not cells:
        return ["No fine-tuning runs of these weights in the store yet."]
    lines = ["| Task | Labels | Metric (test, x 100) | Seeds |", "|---|---|---|---|"]
    for (task, frac), mine in sorted(cells.items()):
        try:
            metric = tasks.get(task).metric
        except ConfigError:  # a task of another g2d version
            lines.append(f"| {task} | {frac:.0%} | (a task this g2d does not know: {len(mine)} run(s)) | |")
            continue
        values = _per_seed(mine, f"test/{metric}")
        if not values:
            lines.append(f"| {task} | {frac:.0%} | {metric}: no finite test score ({len(mine)} run(s)) | |")
            continue
        s = study_stats.summarise([100 * v for v in values.values()], confidence=params.study.confidence,
                                  n_resamples=params.study.resamples, seed=0)
        lines.append(f"| {task} | {frac:.0%} | {metric} {_fmt(s)} | {', '.join(map(str, values))} |")
    return lines


def card(params: Params, best: Candidate, ranked: list[Candidate], tmp: Path) -> str:
    rule, info = params.promote, best.version
    folder = tmp / "card"
    config = yaml.safe_load(tracking.version_file(info, "config.yaml", folder, uri=params.tracking.uri).read_text())
    stage_params = tracking.version_file(info, "params.yaml", folder, uri=params.tracking.uri).read_text()
    model, level = config.get("model", {}), f"{params.study.confidence:.0%}"
    ranking = "\n".join(f"| v{c.version.version} | {100 * c.mean:.1f} | {len(c.scores)} | `{c.sha256[:16]}` |"
                        for c in ranked)
    return f"""# {rule.model}@{rule.alias}: version {info.version}

A G2D pre-trained chest X-ray encoder (Liu et al., NeurIPS 2024): {model.get('encoder')} U-Net image tower with
its decoder, `{model.get('text_model')}` text tower, d = {model.get('embed_dim')}, {model.get('heads')} attention
heads, dense pretext `{config.get('dense')}`, {config.get('image_size')} px. Generated by `g2d models promote`
from the registry entry; also the version's description in MLflow.

## Why this version
The rule in params.promote: the best mean over seeds of `{rule.score}` when fine-tuning on `{rule.task}` with
{rule.frac:.0%} of the labels, among versions of `{rule.model}` with at least {rule.min_seeds} seeds.

| Version | Mean {rule.score} x 100 | Seeds | Weights sha256 |
|---|---|---|---|
{ranking}

## Provenance
- registry: `models:/{rule.model}/{info.version}` (alias `{rule.alias}`), MLflow run `{info.run_id}`, source
  `{info.source}`
- weights: `model.safetensors`, sha256 `{best.sha256}`
- pre-training data sha256 `{config.get('data_hash')}`; train split ids sha256 `{config.get('split_hash')}`

## Fine-tuning results of these weights
Test metric x 100: mean ± sd over seeds [{level} bootstrap interval of the mean; with few seeds it is too
narrow, see reports/study.md]. The newest finished `g2d train` run per seed in the store that started from these
weights, study variants (`--variant`) left out.

{chr(10).join(results_table(params, best.sha256))}

## Pre-training params
```yaml
{stage_params.rstrip()}
```

## Intended use and limits
For research on label-efficient dense and global tasks of chest radiographs: initialise segmentation,
detection and classification models and compare pre-training methods. Not a medical device and not for
diagnosis. Pre-trained on the data named by the hash above: with the embedded SynthCXR (rendered images with
real IU reports) its features reflect synthetic anatomy, and its scores say nothing about real radiographs
until it is fine-tuned and tested on them. Files: `model.safetensors` (weights only), `config.yaml`.
"""
