"""Is the default fine-tuning budget converged? Reruns the 100% cells of a task (every init of matrix.inits,
every seed of matrix.seeds) with twice the epochs and twice the patience, and prints how far each init's mean
over seeds moves from the committed run (metrics/finetune/<task>/<init>/), against max(1 point, one seed-sd of
the committed run). Nothing it trains is kept: metrics go to a temporary folder, runs to a throwaway MLflow store.

    python benchmarks/convergence.py --task siim-seg
    python benchmarks/convergence.py --task rsna-det --factor 2 --inits g2d random

`--set KEY=VALUE` changes the rerun in other ways too; with `--factor 1` it measures what such a change
costs against the committed run, e.g. MGCA's fresh augmentation instead of the default's cached views:

    python benchmarks/convergence.py --task siim-seg --factor 1 --inits g2d \
        --set finetune.segmentation.augment.views=null
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECIPE_KEYS = ("batch_size", "epochs", "lr", "weight_decay", "patience")


def committed(folder: Path, task: str, init: str, seeds: list[int]) -> dict[int, dict]:
    out = {}
    for seed in seeds:
        path = folder / task / init / f"{task}_1.0_{init}_seed{seed}.json"
        if not path.is_file():
            sys.exit(f"convergence: {path} is missing; run `dvc repro` (or `g2d train --task {task} --init {init} "
                     "--matrix`) first")
        out[seed] = json.loads(path.read_text())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True)
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--inits", nargs="*", help="default: matrix.inits")
    ap.add_argument("--factor", type=float, default=2.0, help="budget multiplier for epochs and patience")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="another change to the rerun's params (repeatable)")
    ap.add_argument("--json", help="also write the table as JSON here")
    args = ap.parse_args()

    from g2d.config import load_params
    from g2d.data import tasks
    from g2d.pipeline.finetune import stage as finetune

    params = load_params(args.params)
    spec = tasks.get(args.task)
    section = finetune._section(spec)
    recipe = getattr(params.finetune, section)
    inits = args.inits or list(params.matrix.inits)
    seeds = list(params.matrix.seeds)
    metrics_dir = REPO / params.paths.metrics / "finetune"  # the committed run
    before = {init: committed(metrics_dir, spec.name, init, seeds) for init in inits}
    for init, cells in before.items():
        for seed, m in cells.items():
            made = {k: m.get("recipe", {}).get(k) for k in RECIPE_KEYS}
            now = {k: getattr(recipe, k) for k in RECIPE_KEYS}
            if made != now:
                sys.exit(f"convergence: {spec.name} {init} seed {seed} was trained with {made}, params say {now}; "
                         "rerun `dvc repro` first so the committed run is the default's")
    epochs, patience = round(recipe.epochs * args.factor), round(recipe.patience * args.factor)
    rows = []
    with tempfile.TemporaryDirectory(prefix="g2d-convergence-") as tmp:
        overrides = [f"finetune.{section}.epochs={epochs}", f"finetune.{section}.patience={patience}",
                     f"paths.metrics={tmp}/metrics", f"tracking.uri=sqlite:///{tmp}/mlflow.db", *args.overrides]
        longer = load_params(args.params, overrides)
        for init in inits:
            start = time.perf_counter()
            outcomes = finetune.run_cells(longer, spec.name, [1.0], init, seeds)
            after = {o.metrics["seed"]: o.metrics for o in outcomes}
            old = [before[init][s]["score"] for s in seeds]
            new = [after[s]["score"] for s in seeds]
            sd = statistics.stdev(old) if len(old) > 1 else 0.0
            move = statistics.mean(new) - statistics.mean(old)
            rows.append({"task": spec.name, "init": init, "seeds": len(seeds), "mean": statistics.mean(old),
                         "mean_2x": statistics.mean(new), "move": move, "sd": sd,
                         "epochs": [before[init][s]["epochs"] for s in seeds],
                         "epochs_2x": [after[s]["epochs"] for s in seeds],
                         "holds": abs(move) <= max(0.01, sd), "minutes": (time.perf_counter() - start) / 60})
    changed = ", ".join([f"{epochs} epochs, patience {patience}", *args.overrides])
    print(f"\n{spec.name} at 100% labels: the default ({recipe.epochs} epochs, patience {recipe.patience}) against "
          f"{changed}; {spec.metric} x 100, mean over seeds {seeds}\n")
    print("| init | default | rerun | move | seed-sd | epochs run (default / rerun) | within max(1, sd) |")
    print("|---|---:|---:|---:|---:|---|---|")
    for r in rows:
        print(f"| {r['init']} | {100 * r['mean']:.1f} | {100 * r['mean_2x']:.1f} | {100 * r['move']:+.1f} | "
              f"{100 * r['sd']:.1f} | {r['epochs']} / {r['epochs_2x']} | "
              f"{'yes' if r['holds'] else 'NO'} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
