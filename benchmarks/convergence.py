"""Is the default fine-tuning budget converged? Reruns the cells of a task at the given label fractions (default
100%; every init of matrix.inits, every seed of matrix.seeds) with twice the epochs and twice the patience, and
prints how far each (fraction, init)'s mean over seeds moves from the baseline, against max(1 point, one seed-sd of
the baseline). The baseline is the committed run (metrics/finetune/<task>/<init>/), or with `--baseline here` the
default budget rerun on this machine first, so that a machine's rounding (README: Quickstart) is not read as the
budget's effect. Nothing it trains is kept: metrics go to a temporary folder, runs to a throwaway MLflow store.

    python benchmarks/convergence.py --task siim-seg
    python benchmarks/convergence.py --task rsna-det --factor 2 --inits g2d random
    python benchmarks/convergence.py --task rsna-det --fracs 0.01 0.1 --baseline here

`--set KEY=VALUE` changes the rerun in other ways too; with `--factor 1` it measures what such a change
costs against the committed run, e.g. MGCA's fresh augmentation instead of the default's cached views:

    python benchmarks/convergence.py --task siim-seg --factor 1 --inits g2d \
        --set finetune.segmentation.augment.views=null
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECIPE_KEYS = ("batch_size", "epochs", "epoch_length", "lr", "weight_decay", "patience")
BEFORE_EPOCH_LENGTH = {"epoch_length": "pass"}  # metrics files written before the option were one-pass epochs


def committed(folder: Path, task: str, frac: float, init: str, seeds: list[int]) -> dict[int, dict]:
    from g2d.pipeline.metrics_files import cell_path

    out = {}
    for seed in seeds:
        path = cell_path(folder, task, frac, init, seed)
        if not path.is_file():
            sys.exit(f"convergence: {path} is missing; run `dvc repro` (or `g2d train --task {task} --init {init} "
                     "--matrix`) first, or measure against `--baseline here`")
        out[seed] = json.loads(path.read_text())
    return out


def trained(params, task: str, fracs: list[float], init: str, seeds: list[int]) -> dict[float, dict[int, dict]]:
    """{frac: {seed: metrics}} of cells trained now, under `params`."""
    from g2d.pipeline.finetune import stage as finetune

    out: dict[float, dict[int, dict]] = {f: {} for f in fracs}
    for o in finetune.run_cells(params, task, fracs, init, seeds):
        out[o.metrics["frac"]][o.metrics["seed"]] = o.metrics
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True)
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--inits", nargs="*", help="default: matrix.inits")
    ap.add_argument("--fracs", nargs="*", type=float, default=[1.0], help="label fractions (default: 1.0)")
    ap.add_argument("--baseline", choices=["committed", "here"], default="committed",
                    help="committed: the metrics files of the committed run; here: the default budget, rerun first")
    ap.add_argument("--factor", type=float, default=2.0, help="budget multiplier for epochs and patience")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="another change to the rerun's params (repeatable)")
    ap.add_argument("--json", help="also write the table as JSON here")
    args = ap.parse_args()
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # they would win over the throwaway store
        os.environ.pop(var, None)

    from g2d.config import load_params
    from g2d.data import tasks
    from g2d.pipeline.finetune import stage as finetune

    params = load_params(args.params)
    spec = tasks.get(args.task)
    section = finetune._section(spec)
    recipe = getattr(params.finetune, section)
    inits = args.inits or list(params.matrix.inits)
    seeds = list(params.matrix.seeds)
    now = {k: getattr(recipe, k) for k in RECIPE_KEYS}
    epochs, patience = round(recipe.epochs * args.factor), round(recipe.patience * args.factor)
    rows = []
    with tempfile.TemporaryDirectory(prefix="g2d-convergence-") as tmp:
        where = [f"tracking.uri=sqlite:///{tmp}/mlflow.db"]
        default = load_params(args.params, [f"paths.metrics={tmp}/metrics-default", *where])
        longer = load_params(args.params, [f"finetune.{section}.epochs={epochs}",
                                           f"finetune.{section}.patience={patience}",
                                           f"paths.metrics={tmp}/metrics", *where, *args.overrides])
        for init in inits:
            start = time.perf_counter()
            if args.baseline == "here":
                before = trained(default, spec.name, args.fracs, init, seeds)
            else:
                folder = REPO / params.paths.metrics
                before = {f: committed(folder, spec.name, f, init, seeds) for f in args.fracs}
                for frac, cells in before.items():
                    for seed, m in cells.items():
                        made = {k: {**BEFORE_EPOCH_LENGTH, **m.get("recipe", {})}.get(k) for k in RECIPE_KEYS}
                        if made != now:
                            sys.exit(f"convergence: {spec.name} {frac:.0%} {init} seed {seed} was trained with "
                                     f"{made}, params say {now}; rerun `dvc repro` first so the committed run is "
                                     "the default's, or measure against `--baseline here`")
            after = trained(longer, spec.name, args.fracs, init, seeds)
            minutes = (time.perf_counter() - start) / 60
            for frac in args.fracs:
                old = [before[frac][s]["score"] for s in seeds]
                new = [after[frac][s]["score"] for s in seeds]
                sd = statistics.stdev(old) if len(old) > 1 else 0.0
                move = statistics.mean(new) - statistics.mean(old)
                rows.append({"task": spec.name, "frac": frac, "init": init, "seeds": len(seeds),
                             "mean": statistics.mean(old), "mean_2x": statistics.mean(new), "move": move, "sd": sd,
                             "scores": old, "scores_2x": new,
                             "epochs": [before[frac][s]["epochs"] for s in seeds],
                             "epochs_2x": [after[frac][s]["epochs"] for s in seeds],
                             "holds": abs(move) <= max(0.01, sd), "minutes": minutes})
    changed = ", ".join([f"{epochs} epochs, patience {patience}", *args.overrides])
    print(f"\n{spec.name}: the default ({recipe.epochs} epochs, patience {recipe.patience}; baseline: "
          f"{args.baseline}) against {changed}; {spec.metric} x 100, mean over seeds {seeds}\n")
    print("| labels | init | default | rerun | move | seed-sd | epochs run (default / rerun) | within max(1, sd) |")
    print("|---|---|---:|---:|---:|---:|---|---|")
    for r in rows:
        print(f"| {r['frac']:.0%} | {r['init']} | {100 * r['mean']:.1f} | {100 * r['mean_2x']:.1f} | "
              f"{100 * r['move']:+.1f} | {100 * r['sd']:.1f} | {r['epochs']} / {r['epochs_2x']} | "
              f"{'yes' if r['holds'] else 'NO'} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
