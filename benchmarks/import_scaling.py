"""How `g2d data import` scales: images/s with 1 and with all worker processes, and the importing
process's peak memory (VmHWM) at two dataset sizes: it should not grow with the number of images beyond
the small per-image metadata. Builds SIIM-layout DICOMs in a temporary folder (in a separate process, so
nothing of the build counts); run from the repo root:

    python benchmarks/import_scaling.py --sizes 1000 8000 --pixels 512
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, re, sys, time
from pathlib import Path
from g2d.data import importing
raw, out, workers = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
t = time.perf_counter()
r = importing.run("siim", raw, out, "siim-patient", importing.Options(image_size=256, workers=workers))
hwm = int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))  # this process only
print(json.dumps({"rows": r.rows, "seconds": time.perf_counter() - t, "main_peak_mb": hwm / 1024}))
"""
BUILD = r"""
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from tests.layouts import siim
siim.build(Path(sys.argv[1]), n=int(sys.argv[2]), size=int(sys.argv[4]))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 4000])
    ap.add_argument("--pixels", type=int, default=512)
    args = ap.parse_args()
    repo = str(Path(__file__).resolve().parents[1])
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            raw = Path(tmp) / f"raw{n}"
            subprocess.run([sys.executable, "-c", BUILD, str(raw), str(n), repo, str(args.pixels)], check=True)
            for workers in (1, cores):
                out = Path(tmp) / f"out{n}-{workers}"
                res = subprocess.run([sys.executable, "-c", CHILD, str(raw), str(out), str(workers)],
                                     capture_output=True, text=True, check=True)
                stats = json.loads(res.stdout.strip().splitlines()[-1])
                print(f"{n:6d} images {args.pixels} px, workers {workers}: {stats['rows'] / stats['seconds']:6.1f} "
                      f"images/s, main process peak {stats['main_peak_mb']:.0f} MB")
                shutil.rmtree(out)
            shutil.rmtree(raw)


if __name__ == "__main__":
    main()
