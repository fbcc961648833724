"""How pre-training data scales: images/s and resident memory of a DataLoader over PairDataset at two
manifest sizes, for three ways of storing the images:

    png     the manifest's 512 px PNGs, decoded and resized on every read (PairDataset's default)
    shards  tar files of 1,000 pre-resized PNGs each (WebDataset-style), read by offset and decoded
    pack    the .npy pack of g2d.data.packed (pre-resized uint8), read with os.pread (what g2d ships)
    mmap    the same pack read through np.load(mmap_mode="r"), for comparison

Each (size, format) runs in a fresh process (train split, augmentation on, a seeded RandomSampler of
batches x batch-size items, the given number of workers); this process samples the memory of that process
and its workers every 50 ms: RSS summed (shared pages counted once per process) and PSS summed (shared
pages divided among the processes sharing them: the fairer total). Images are a few hundred SynthCXR
radiographs rendered at 512 px, hard-linked under a distinct name per row; reports, findings and labels
are sampled from datasets/synthcxr/pretrain/manifest.csv when present. Reads are from a warm page cache.
Run from the repo root (on 2 cores: ~15 minutes to build the 50k pack and shards, ~10 to measure;
--data DIR keeps the built data for the next run):

    python benchmarks/data_scaling.py --sizes 1000 50000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
REAL_MANIFEST = REPO / "datasets/synthcxr/pretrain/manifest.csv"
FORMATS = ("png", "shards", "pack", "mmap")
SHARD = 1000
_LUNGS: list = []


# ---------------------------------------------------------------- building the data (this process)


def _render(k: int) -> np.ndarray:
    from g2d.data.synthcxr.render import render_radiograph

    return render_radiograph(_LUNGS[k % len(_LUNGS)].mask, [], np.random.default_rng([7, k])).image


def source_images(out: Path, n: int, pixels: int) -> list[Path]:
    """n distinct radiographs at pixels x pixels: SynthCXR films when the lung masks are fetched (data/),
    else smooth noise with film grain (PNG decoding cost is then lower than a real film's)."""
    from PIL import Image

    out.mkdir(parents=True)
    zip_path = REPO / "data/semantic_masks_v7labs_lungs.zip"
    if zip_path.is_file():
        from g2d.data.sources import lungs

        _LUNGS[:] = lungs.load_lung_fields(zip_path, pixels).fields
        import multiprocessing as mp

        with ProcessPoolExecutor(os.cpu_count() or 1, mp_context=mp.get_context("fork")) as pool:  # see _LUNGS
            images = list(pool.map(_render, range(n), chunksize=8))
    else:
        rng = np.random.default_rng(7)
        images = []
        for _ in range(n):
            small = rng.normal(128, 40, (16, 16)).clip(0, 255).astype(np.uint8)
            big = np.asarray(Image.fromarray(small).resize((pixels, pixels), Image.Resampling.BICUBIC), np.float32)
            images.append((big + rng.normal(0, 6, big.shape)).clip(0, 255).astype(np.uint8))
    paths = []
    for k, image in enumerate(images):
        paths.append(out / f"film{k:04d}.png")
        Image.fromarray(image).save(paths[-1], format="PNG")
    return paths


def build_dataset(folder: Path, n: int, sources: list[Path]) -> None:
    """A manifest of n training rows, each with its own image name (a hard link to a source film)."""
    import pandas as pd

    from g2d.data import manifest as mf

    rng = np.random.default_rng(n)
    (folder / "images").mkdir(parents=True)
    if REAL_MANIFEST.is_file():
        real = pd.read_csv(REAL_MANIFEST, dtype=str, keep_default_na=False)
        df = real.iloc[rng.integers(0, len(real), n)].reset_index(drop=True)
    else:
        words = np.array("the lungs are clear no focal consolidation effusion or pneumothorax heart size is "
                         "normal mediastinal contours stable right left lower lobe opacity".split())
        df = pd.DataFrame({"report": [" ".join(rng.choice(words, rng.integers(20, 80))) + "." for _ in range(n)],
                           "findings": "[]", "boxes": "[]"})
    df["id"] = [f"row{i:06d}" for i in range(n)]
    df["image"] = [f"images/row{i:06d}.png" for i in range(n)]
    df["patient_id"] = df["study_id"] = df["id"]
    df["split"] = "train"
    for i, rel in enumerate(df["image"]):
        try:
            os.link(sources[i % len(sources)], folder / rel)
        except OSError:
            shutil.copyfile(sources[i % len(sources)], folder / rel)
    mf.write_manifest(df, folder)


def build_shards(pack_path: Path, out: Path) -> Path:
    """Tar shards of SHARD pre-resized PNGs each (from the pack: the same pixels), plus an index
    (shard, offset, length per manifest row) so a map-style dataset can read one member."""
    from PIL import Image

    view = np.load(pack_path, mmap_mode="r")
    out.mkdir(parents=True)
    index = np.zeros((len(view), 3), dtype=np.int64)
    for s in range(0, len(view), SHARD):
        with tarfile.open(out / f"shard-{s // SHARD:05d}.tar", "w") as tar:
            for i in range(s, min(s + SHARD, len(view))):
                buf = io.BytesIO()
                Image.fromarray(np.array(view[i])).save(buf, format="PNG")
                info = tarfile.TarInfo(f"{i:08d}.png")
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)
        with tarfile.open(out / f"shard-{s // SHARD:05d}.tar") as tar:
            for member in tar.getmembers():
                index[int(member.name[:8])] = (s // SHARD, member.offset_data, member.size)
    np.save(out / "index.npy", index)
    return out


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20


# ---------------------------------------------------------------- one measured run (a child process)


def _collate(items: list[dict]) -> dict:
    import torch

    return {"image": torch.stack([it["image"] for it in items]), "report": [it["report"] for it in items],
            "id": [it["id"] for it in items]}


def child(args) -> None:
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, RandomSampler

    from g2d.data.pairs import PairDataset, seed_worker

    class ShardPairs(PairDataset):
        """Images from tar shards of pre-resized PNGs; the shard files are opened per process."""

        def __init__(self, *a, shards: Path, **kw) -> None:
            super().__init__(*a, **kw)
            self.shards, self.index, self._fds = shards, np.load(shards / "index.npy"), {}

        def image(self, index: int):
            shard, offset, length = self.index[self.rows.manifest_index[index]]
            key = (os.getpid(), int(shard))
            if key not in self._fds:
                self._fds[key] = os.open(self.shards / f"shard-{shard:05d}.tar", os.O_RDONLY)
            with Image.open(io.BytesIO(os.pread(self._fds[key], int(length), int(offset)))) as im:
                im.load()
                return im

    class MmapPairs(PairDataset):
        """The pack read through a per-process memory map instead of pread."""

        def __init__(self, *a, pack: Path, **kw) -> None:
            super().__init__(*a, packed=pack, **kw)
            self.pack_path, self._view = pack, None

        def image(self, index: int):
            if self._view is None or self._view[0] != os.getpid():
                self._view = (os.getpid(), np.load(self.pack_path, mmap_mode="r"))
            return Image.fromarray(np.array(self._view[1][self.rows.manifest_index[index]]))

    t = time.perf_counter()
    common = dict(split="train", size=args.image_size, augment=True, seed=0)
    if args.child == "png":
        ds = PairDataset(args.folder, **common)
    elif args.child == "pack":
        ds = PairDataset(args.folder, packed=args.pack, **common)
    elif args.child == "mmap":
        ds = MmapPairs(args.folder, pack=args.pack, **common)
    else:
        ds = ShardPairs(args.folder, shards=args.shards, **common)
    build_s = time.perf_counter() - t
    sampler = RandomSampler(ds, num_samples=args.batches * args.batch_size, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                        collate_fn=_collate, worker_init_fn=seed_worker)
    n, first, steady = 0, None, {}
    for k, batch in enumerate(loader):
        n += len(batch["id"])
        if first is None:
            first, n0 = time.perf_counter(), n
        if k == args.batches - 1:  # the last batch: every worker is still alive
            elapsed = time.perf_counter() - first
            steady = tree_memory(os.getpid())
    print(json.dumps({"images_per_s": (n - n0) / elapsed, "dataset_build_s": build_s, "rows": len(ds),
                      "rows_bytes": ds.rows.nbytes, "items": n, "steady": steady}))


ROLLUP = {"Rss": "rss", "Pss": "pss", "Pss_Anon": "anon", "Pss_Shmem": "anon", "Private_Clean": "uss",
          "Private_Dirty": "uss"}


def _rollup(pid: int) -> dict:
    out = dict.fromkeys(ROLLUP.values(), 0)
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        if key in ROLLUP:
            out[ROLLUP[key]] += int(value.split()[0]) * 1024
    return out


def tree_memory(pid: int) -> dict:
    """Memory (MB) of process pid plus its children, summed from /proc/*/smaps_rollup: RSS (shared pages
    counted in every process that maps them), PSS (shared pages divided among their sharers, system-wide, so
    other programs running the same libraries lower it), anon = PSS of anonymous and shared memory (what
    the data and copy-on-write cost; never shared outside this process tree, so other programs do not move
    it) and USS (pages private to one process); and the main process's RSS alone."""
    import psutil

    main = psutil.Process(pid)
    total = dict.fromkeys(ROLLUP.values(), 0)
    for p in [main, *main.children(recursive=True)]:
        for k, v in _rollup(p.pid).items():
            total[k] += v
    return {**{k: v / 2**20 for k, v in total.items()}, "main_rss": main.memory_info().rss / 2**20}


def measure(cmd: list[str]) -> dict:
    """Run cmd, sampling its memory (tree_memory) every 50 ms: its JSON line plus the peaks."""
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peaks = {"rss": 0.0, "pss": 0.0, "anon": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                now = tree_memory(proc.pid)
                peaks.update({k: max(v, now[k]) for k, v in peaks.items()})
            except (psutil.Error, OSError):  # a worker exited between listing and reading
                pass
            time.sleep(0.05)

    thread = threading.Thread(target=sample)
    thread.start()
    out, _ = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit status {proc.returncode}")
    stats = json.loads(out.strip().splitlines()[-1])
    return {**{k: v for k, v in stats.items() if k != "steady"}, **stats["steady"],
            **{f"peak_{k}": v for k, v in peaks.items()}}


COLUMNS = ("rss", "pss", "anon", "uss", "main_rss", "peak_rss", "peak_pss", "peak_anon")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 50000])
    ap.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3, help="runs per (size, format), formats interleaved; medians")
    ap.add_argument("--pixels", type=int, default=512, help="side of the source PNGs")
    ap.add_argument("--distinct", type=int, default=200, help="distinct source films, reused across rows")
    ap.add_argument("--tmp", type=Path, default=None, help="where to build the data (default: a temp folder)")
    ap.add_argument("--data", type=Path, default=None,
                    help="build the data here and keep it; a later run reuses what is there (a stale pack is rebuilt)")
    ap.add_argument("--child", choices=FORMATS, help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--pack", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--shards", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    from g2d.data import manifest as mf
    from g2d.data import packed
    from g2d.errors import DataError

    root = args.data or Path(tempfile.mkdtemp(prefix="g2d-data-scaling-", dir=args.tmp))
    runs: dict[tuple[int, str], list[dict]] = {}
    try:
        t = time.perf_counter()
        if not (root / "sources").is_dir():
            source_images(root / "sources", args.distinct, args.pixels)
            print(f"{args.distinct} source films of {args.pixels} px in {time.perf_counter() - t:.0f} s", flush=True)
        sources = sorted((root / "sources").glob("*.png"))
        for n in args.sizes:
            folder, pack_path, shards = root / f"rows{n}", root / f"pack{n}.npy", root / f"shards{n}"
            if not (folder / "manifest.csv").is_file():
                shutil.rmtree(folder, ignore_errors=True)
                build_dataset(folder, n, sources)
            try:
                packed.PackedImages.open(pack_path, folder, list(mf.read_manifest(folder)["image"]), args.image_size)
            except DataError:
                t = time.perf_counter()
                packed.pack_manifest(folder, args.image_size, pack_path, workers=0)
                print(f"{n} rows: pack {pack_path.stat().st_size / 2**20:.0f} MB built in "
                      f"{time.perf_counter() - t:.0f} s ({n / (time.perf_counter() - t):.0f} images/s, all cores)",
                      flush=True)
                shutil.rmtree(shards, ignore_errors=True)
            if "shards" in args.formats and not (shards / "index.npy").is_file():
                shutil.rmtree(shards, ignore_errors=True)
                t = time.perf_counter()
                build_shards(pack_path, shards)
                print(f"{n} rows: shards {folder_mb(shards):.0f} MB built from the pack in "
                      f"{time.perf_counter() - t:.0f} s", flush=True)
            for _ in range(args.repeats):
                for fmt in args.formats:
                    cmd = [sys.executable, __file__, "--child", fmt, "--folder", str(folder), "--pack", str(pack_path),
                           "--shards", str(shards), "--batches", str(args.batches), "--batch-size",
                           str(args.batch_size), "--workers", str(args.workers), "--image-size", str(args.image_size)]
                    r = measure(cmd)
                    runs.setdefault((n, fmt), []).append(r)
                    print(f"  {n} {fmt:6s} {r['images_per_s']:6.1f} images/s; last batch RSS {r['rss']:5.0f} MB, "
                          f"PSS {r['pss']:5.0f} MB, anon {r['anon']:5.0f} MB, USS {r['uss']:5.0f} MB", flush=True)
    finally:
        if not args.data:
            shutil.rmtree(root, ignore_errors=True)

    med = {key: {k: float(np.median([r[k] for r in rs])) for k in ("images_per_s", "rows_bytes", *COLUMNS)}
           for key, rs in runs.items()}
    print(f"\n{args.batches} batches of {args.batch_size} at {args.image_size} px, {args.workers} workers, "
          f"augmentation on; medians of {args.repeats} runs. Memory in MB, main process + workers summed, at the "
          f"last batch\nand the peak over the run (sampled every 50 ms, start-up and exit included); anon = PSS of "
          f"anonymous + shared memory;\nrow text = PairDataset.rows\n")
    print(f"{'rows':>6} {'format':6} {'images/s':>8} {'(min-max)':>11} {'RSS':>6} {'PSS':>5} {'anon':>5} {'USS':>5} "
          f"{'main RSS':>8} {'peak RSS':>8} {'peak PSS':>8} {'peak anon':>9} {'row text':>8}")
    for (n, fmt), m in med.items():
        rates = [r["images_per_s"] for r in runs[(n, fmt)]]
        print(f"{n:6d} {fmt:6} {m['images_per_s']:8.1f} {min(rates):5.0f}-{max(rates):<5.0f} {m['rss']:6.0f} "
              f"{m['pss']:5.0f} {m['anon']:5.0f} {m['uss']:5.0f} {m['main_rss']:8.0f} {m['peak_rss']:8.0f} "
              f"{m['peak_pss']:8.0f} {m['peak_anon']:9.0f} {m['rows_bytes'] / 2**20:8.1f}")
    lo, hi = min(args.sizes), max(args.sizes)
    if lo != hi:
        print(f"\nmemory at {hi} rows vs {lo} rows (done when within 10%):")
        for fmt in args.formats:
            a, b = med[(lo, fmt)], med[(hi, fmt)]
            print(f"  {fmt:6} " + "  ".join(f"{k} {b[k] / a[k] - 1:+6.1%}" for k in COLUMNS if k != "uss"))
    for n in args.sizes:  # each run's rate against the same repeat's pack run: fair under changing load
        if "pack" not in args.formats:
            continue
        ratios = {fmt: [p["images_per_s"] / r["images_per_s"] for p, r in zip(runs[(n, "pack")], runs[(n, fmt)],
                                                                            strict=True)]
                  for fmt in args.formats if fmt != "pack"}
        print(f"{n} rows, images/s of pack / other, median (min-max) over the repeats: " + ", ".join(
            f"/ {fmt} {np.median(v):.2f}x ({min(v):.2f}-{max(v):.2f})" for fmt, v in ratios.items()))


if __name__ == "__main__":
    main()
