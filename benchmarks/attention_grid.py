"""Which attention grid should the CPU default pre-train with? Pre-trains G2D once per candidate (input size x
the encoder's output stride) on the default's budget and prints, side by side, the grid, the minutes it took on
this machine and the quality of its pseudo masks on val findings, each beside its chance value (coverage,
precision, IoU of the pseudo masks; the pointing game of the attention maximum), at the end and by epoch.
Nothing it trains is kept: models and metrics go to a temporary folder, runs to a throwaway MLflow store.

    python benchmarks/attention_grid.py                      # the candidates below
    python benchmarks/attention_grid.py --only 4x4 8x8-os16  # some of them
    python benchmarks/attention_grid.py --set pretrain.epochs=6 --json grid.json

Time the candidates with nothing else running: minutes are compared as ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CANDIDATES = {  # name -> overrides of the default's pre-training
    "4x4": [],                                     # 128 px, stride 32: the default before issue 20
    "8x8-os16": ["model.output_stride=16"],        # 128 px, the last stage dilated
    "7x7-224px": ["pretrain.image_size=224"],      # the paper's input size, stride 32
    "8x8-256px": ["pretrain.image_size=256"],      # the authors' code
}
SCORES = ("coverage", "precision", "iou", "pointing")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--only", nargs="*", choices=list(CANDIDATES), help="default: all but 8x8-256px")
    ap.add_argument("--dense", default="pseudo_seg", help="pretrain.dense of every candidate (none: global-only)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="another change to every candidate (repeatable)")
    ap.add_argument("--json", help="also write the rows as JSON here")
    args = ap.parse_args()

    from g2d.config import load_params
    from g2d.pipeline.pretrain import stage as pretrain

    rows = []
    for name in args.only or [c for c in CANDIDATES if c != "8x8-256px"]:
        with tempfile.TemporaryDirectory(prefix="g2d-grid-") as tmp:
            params = load_params(args.params, [
                f"paths.models={tmp}/models", f"paths.metrics={tmp}/metrics", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                f"pretrain.dense={args.dense}", *CANDIDATES[name], *args.overrides])
            grid = params.pretrain.image_size // params.model.output_stride
            print(f"== {name}: {params.pretrain.image_size} px, stride {params.model.output_stride}, "
                  f"grid {grid}x{grid}", flush=True)
            start = time.perf_counter()
            outcome = pretrain.run(params)
            minutes = (time.perf_counter() - start) / 60
            m = outcome.metrics
            rows.append({"candidate": name, "image_size": params.pretrain.image_size,
                         "output_stride": params.model.output_stride, "grid": grid, "minutes": minutes,
                         "steps": m["steps"], "pseudo_mask": m["pseudo_mask"],
                         "by_epoch": m["pseudo_mask_by_epoch"], "retrieval_R@10": m["retrieval"]["i2t_R@10"]})
    print(f"\npre-training ({args.dense}) on the default's budget, {rows[0]['steps']} steps; val images with a "
          "rendered finding, mean; chance in brackets\n")
    print("| candidate | grid | minutes | coverage | precision | IoU | pointing | i2t R@10 |")
    print("|---|---|---:|---|---|---|---|---:|")
    for r in rows:
        q = r["pseudo_mask"]
        cells = " | ".join(f"{q[s]:.3f} ({q[f'{s}_chance']:.3f})" for s in SCORES)
        print(f"| {r['candidate']} | {r['grid']}x{r['grid']} | {r['minutes']:.1f} | {cells} | "
              f"{r['retrieval_R@10']:.3f} |")
    print("\nby epoch (coverage / pointing, x chance):")
    for r in rows:
        curve = ", ".join(f"{e['epoch']:g}: {e['coverage'] / e['coverage_chance']:.2f} / "
                          f"{e['pointing'] / e['pointing_chance']:.2f}" for e in r["by_epoch"])
        print(f"  {r['candidate']}: {curve}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
