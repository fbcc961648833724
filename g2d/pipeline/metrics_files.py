"""The small JSON metrics files the stages write and DVC tracks (`metrics/...`): their names, writing them, and
reading them back. The report, the study and promotion read and name them through here only.

JSON has no NaN, so undefined values (an AUC with one outcome) are written as null; a fine-tuning score read
back is NaN then. A fine-tuning cell's file is <task>_<frac>_<row>_seed<S>.json, `row` its init under
metrics/finetune/<task>/<init>/ or its study variant under metrics/study/<task>/<variant>/ (`cell_path`);
zero-shot and grounding files are <task>_<model>.json under metrics/zeroshot, metrics/grounding and
metrics/ablations/grounding.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from g2d.errors import DataError

_T = TypeVar("_T")

# ---------------------------------------------------------------- names


def frac_label(frac: float) -> str:
    """0.01 -> '0.01', 1 -> '1.0': the spelling DVC gives the matrix's fractions (file names, run tags)."""
    return repr(float(frac))


def init_label(name: str) -> str:
    """An init or variant name as it may appear in a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")[:60] or "init"


def cell_path(metrics: Path, task: str, frac: float, init: str, seed: int, variant: str | None = None) -> Path:
    """metrics/finetune/<task>/<init>/<task>_<frac>_<init>_seed<S>.json under the metrics folder `metrics`, a cell of
    the DVC stage of (task, init); a study variant's run goes to metrics/study/<task>/<variant>/
    <task>_<frac>_<variant>_seed<S>.json instead."""
    folder, row = ("finetune", init_label(init)) if variant is None else ("study", init_label(variant))
    return metrics / folder / task / row / f"{task}_{frac_label(frac)}_{row}_seed{seed}.json"


# ---------------------------------------------------------------- writing


def finite(obj):
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write(path: Path, metrics: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(finite(metrics), indent=2, allow_nan=False) + "\n")
    return path


def numbers(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a flat dict, as MLflow metrics."""
    return {f"{prefix}{k}": float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


# ---------------------------------------------------------------- reading


def files(folder: Path, pattern: str = "*.json", recursive: bool = False) -> list[Path]:
    """The metrics files of a folder in name order; none when the folder does not exist (a stage not run yet)."""
    if not folder.is_dir():
        return []
    return sorted(folder.rglob(pattern) if recursive else folder.glob(pattern))


def parse(path: Path, kind: str, fields: Callable[[dict], _T], rerun: str = "its stage (`dvc repro`)") -> _T:
    """`fields` of the file's JSON; a file that is not JSON, or lacks what `fields` takes, is an error naming it."""
    try:
        return fields(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: not a g2d {kind} metrics file ({type(e).__name__}: {e}); delete it or re-run "
                        f"{rerun}") from None


@dataclass(frozen=True)
class Result:
    """One fine-tuning run's metrics file."""

    task: str
    frac: float
    row: str  # the init of a matrix run, the variant of a study run
    seed: int | None  # None: a file of an older g2d version, named without a seed
    metric: str
    score: float  # NaN: undefined (null in the file)
    ids: tuple[str, ...] | None  # test images, when per-image scores were saved
    per_image: tuple[float, ...] | None
    data_hash: str | None
    fraction_sha256: str | None
    file: str
    dice_positive: float | None = None  # segmentation: Dice over the test images with a finding
    empty_correct: float | None = None  # ... and the share of those without one predicted empty
    dice_pooled: float | None = None  # ... and the foreground Dice of all test pixels at once


def _result(m: dict, file: str, study: bool, seeded: bool) -> Result:
    per = m.get("per_image") or {}
    row = m["variant"] if study else m["init"]
    if row is None:
        raise KeyError("variant" if study else "init")
    seed = int(m["seed"]) if seeded or m.get("seed") is not None else None
    test = m.get("test") or {}
    return Result(m["task"], float(m["frac"]), row, seed, m["metric"],
                  math.nan if m["score"] is None else float(m["score"]),
                  tuple(per["ids"]) if "ids" in per else None,
                  tuple(float(v) for v in per["dice"]) if "dice" in per else None,
                  m.get("data_hash"), m.get("fraction_sha256"), file,
                  test.get("dice_positive"), test.get("empty_correct"), test.get("dice_pooled"))


def read_cells(folder: Path, study: bool = False) -> list[Result]:
    """Every fine-tuning metrics file under `folder` (recursively), whatever its name: results.md tables the
    matrix's runs and lists the others, files of older g2d versions without a seed among them."""
    return [parse(path, "fine-tuning", lambda m, f=path.name: _result(m, f, study, seeded=False))
            for path in files(folder, "*.json", recursive=True)]


def read_results(folder: Path, study: bool) -> list[Result]:
    """Every metrics file of a folder named as the stages name them (<task>_<frac>_<row>_seed<S>.json; files of
    older g2d versions, without a seed, are left to results.md's "other runs"); a file that is not a g2d
    fine-tuning metrics file, or a second file of the same run, is an error naming it. Seeds outside
    matrix.seeds and variants outside study.variants are read but left out of the tables; the Data table
    counts every run read."""
    out: list[Result] = []
    seen: dict[tuple, str] = {}
    for path in files(folder, "*_seed*.json", recursive=True):
        r = parse(path, "fine-tuning", lambda m, f=path.name: _result(m, f, study, seeded=True))
        key = (r.task, r.frac, r.row, r.seed)
        if key in seen:
            raise DataError(f"{path}: the same run ({r.task}, {r.frac:g} of the labels, {r.row}, seed {r.seed}) as "
                            f"{seen[key]}; keep one of the two files")
        seen[key] = path.name
        out.append(r)
    return out


def read_encoder_results(folder: Path) -> list[dict]:
    """metrics/zeroshot or metrics/grounding files: task, model and the test scores of each."""
    return [parse(path, "zero-shot / grounding", lambda m, f=path.name: {
        "task": m["task"], "model": m["model"], "test": dict(m["test"]), "file": f, "metric": m.get("metric"),
        "score": m.get("score")}) for path in files(folder)]


# ---------------------------------------------------------------- over seeds


def defined(values: Iterable[float | None]) -> list[float]:
    """The scores that count in a cell over seeds: an undefined one (None, NaN: no positive test image) does not."""
    return [v for v in values if v is not None and not math.isnan(v)]


def seed_mean(values: Iterable[float | None]) -> float | None:
    """A cell's mean over its seeds' defined scores (None when none is): results.md's cells and promotion's
    ranking. reports/study.md shows the same cells with their spread and interval (study.stats.summarise)."""
    scores = defined(values)
    return sum(scores) / len(scores) if scores else None
