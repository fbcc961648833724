"""Checks run before the first training step of `g2d pretrain` and `g2d train` (and by `g2d preflight`), so
that a bad input fails in seconds with one clear line instead of hours into a run, and before an MLflow run
is opened (a refused job leaves no run behind).

In order: the config (already validated when it was loaded), the tracking store (reachable, writable), free
disk where the job writes, each dataset against the hash DVC or its dataset.json records
(g2d/data/integrity.py), and each dataset validated (`g2d data validate`: every row's text, the files of
a seeded sample of rows). The lines describing what
was checked are logged with the run (`preflight.txt`).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from g2d import tracking
from g2d.config import Params
from g2d.data import integrity
from g2d.data import manifest as mf
from g2d.errors import DataError, G2DError, TrackingError
from g2d.pipeline.pretrain.paths import paths
from g2d.progress import Reporter, silent

ARTIFACT = "preflight.txt"


class PreflightError(G2DError):
    """The machine cannot run the job (disk space)."""


@dataclass
class Report:
    lines: list[str]
    seconds: float

    def text(self) -> str:
        return "\n".join(self.lines) + f"\n({self.seconds:.1f} s)\n"


def check(params: Params, datasets: Sequence[Path], outputs: Sequence[Path], reporter: Reporter = silent,
          tracked: bool = True) -> Report:
    """Raise the first problem found (a typed G2DError naming the file, key or URI and the fix)."""
    started = time.perf_counter()
    p = params.preflight
    advance = reporter.task("preflight checks", 2 + 2 * len(datasets))
    lines = ["config: valid (params file and --set overrides)"]
    uri = tracking.tracking_uri(params.tracking.uri)
    store = tracking.sqlite_path(uri)
    if tracked:
        tracking.check_reachable(uri)
        if store is not None and not os.access(store if store.exists() else store.parent, os.W_OK):
            raise TrackingError(f"MLflow store {store} is not writable; fix its permissions or set "
                                "MLFLOW_TRACKING_URI to a store you can write")
        lines.append(f"tracking: {tracking.redacted(uri)} reachable")
    advance(1)
    written = [*outputs, *([store.parent, tracking.store_root() / "mlartifacts"] if tracked and store else [])]
    lines.append(f"disk: {_free_disk(written, p.min_free_gb)}")
    advance(1)
    root = tracking.project_root()
    for folder in datasets:
        if p.verify_data:
            verified = integrity.verify(folder, root, hash_all_below=int(p.hash_all_below_gb * 1e9),
                                        sample=p.hash_sample, seed=params.seed)
            lines.append(f"data {folder}: {verified.how}")
        else:
            lines.append(f"data {folder}: not verified (preflight.verify_data is false)")
        advance(1)
        lines.append(f"data {folder}: {_validate_sample(folder, p.decode_sample, params.seed)}")
        advance(1)
    return Report(lines, time.perf_counter() - started)


def _validate_sample(folder: Path, n: int, seed: int) -> str:
    """`g2d data validate` on every row's text and on the files of `n` seeded rows: images decode, masks are
    binary and the image's size, boxes inside; a problem stops the job here rather than when training reaches
    the row."""
    report = mf.validate(folder, sample=n, seed=seed)
    if not report.ok:
        first = report.problems[0]
        where = report.manifest
        if first.rows:  # CSV line numbers: name the first row's id and image too
            row = mf.read_manifest(folder, check_labels=False).iloc[first.rows[0] - 2]
            where = f"{report.manifest} row {first.rows[0]} (id {row['id']}, image {row['image']})"
        more = f" (+{len(report.problems) - 1} other problem(s))" if len(report.problems) > 1 else ""
        raise DataError(f"{where}: {first}{more}; `g2d data validate {report.manifest.parent}` lists every row")
    checked = min(n, report.rows)
    return f"{report.rows} rows valid (text of every row, files of {checked} sampled rows)"


def _existing(path: Path) -> Path:
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _free_disk(paths: Sequence[Path], min_free_gb: float) -> str:
    """Free space on every file system the job writes to (each counted once)."""
    seen: dict[int, tuple[Path, float]] = {}
    for path in paths:
        where = _existing(Path(path))
        seen.setdefault(where.stat().st_dev, (Path(path), shutil.disk_usage(where).free / 1e9))
    for path, free in seen.values():
        if free < min_free_gb:
            raise PreflightError(f"{path}: {free:.2f} GB free on its disk, preflight.min_free_gb needs "
                                 f"{min_free_gb:g}; free some space, or point paths.models / the tracking store "
                                 "at a larger disk")
    return ", ".join(f"{free:.1f} GB free at {path}" for path, free in seen.values())


def run(params: Params, task: str | None = None, reporter: Reporter = silent) -> Report:
    """`g2d preflight`: what `g2d pretrain` checks before its first step, and `g2d train --task TASK` too when a
    task is given (before submitting a long job to a cluster)."""
    from g2d.data import tasks

    data_dir, out, ckpt_dir, metrics = paths(params)
    datasets = [data_dir]
    if task:
        datasets.append(tasks.dataset_folder(tasks.get(task), params, tracking.project_root()))
    return check(params, datasets, [out, ckpt_dir, metrics.parent], reporter)
