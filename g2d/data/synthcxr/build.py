"""Build SynthCXR from the fetched sources: plan every image in one process (deterministic),
render in a pool (each image from its own seed, so the worker count never changes a byte), then
write manifests, patient-level splits, nested label fractions and hashes.

Three datasets, each a manifest folder under the output:
- `pretrain/`: one radiograph per IU report with findings or impression text, drawn from the
  report's MeSH terms and paired with its real text; every drawn finding has a mask and a box.
- `pneumothorax/`: pneumothorax segmentation, shapes from real SIIM-ACR masks.
- `opacity/`: opacity segmentation / detection, boxes from real RSNA Pneumonia labels.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from threadpoolctl import threadpool_limits

from g2d.config import Synth
from g2d.data import manifest as mf
from g2d.data import splits
from g2d.data.sources import embedded, iu_reports, lungs, rsna, siim
from g2d.data.synthcxr import findings as fnd
from g2d.data.synthcxr.render import FindingSpec, render_radiograph
from g2d.errors import ConfigError, DataError
from g2d.progress import Reporter, silent

SETS = ("pretrain", "pneumothorax", "opacity")
STRATUM = {"pretrain": "normal", "pneumothorax": "pneumothorax", "opacity": "opacity"}
_SET_CODE = {name: i for i, name in enumerate(SETS)}
MARKER = "synthcxr.json"
MIN_REGION_OVERLAP = 0.3  # share of a SIIM shape / RSNA box that must fall inside the lung field


@dataclass(frozen=True)
class Job:
    """Everything one worker needs to render one image (small and picklable)."""

    dataset: str
    index: int
    row_id: str
    patient_id: str
    lung: int
    findings: tuple[fnd.Finding, ...]
    siim_rles: tuple[str, ...] = ()  # the pneumothorax shape: all rows of one SIIM image
    boxes: tuple[tuple[float, float, float, float], ...] = ()  # RSNA boxes, one per finding, image px


@dataclass
class BuildResult:
    out: Path
    info: dict[str, dict] = field(default_factory=dict)  # dataset -> dataset.json content
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    not_drawn: Counter = field(default_factory=Counter)  # MeSH head -> count


def _rng(seed: int, dataset: str, *more: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SET_CODE[dataset], *more])


# ---------------------------------------------------------------- regions


def siim_region(rles: tuple[str, ...], size: int) -> np.ndarray:
    mask = siim.image_mask(list(rles), where="SIIM shape")
    small = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.Resampling.BOX)
    return np.asarray(small) >= 128


def box_region(box: tuple[float, float, float, float], size: int) -> np.ndarray:
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    region = np.zeros((size, size), dtype=bool)
    region[max(y0, 0):min(y1, size), max(x0, 0):min(x1, size)] = True
    return region


def _overlap(region: np.ndarray, lung: np.ndarray) -> float:
    return float((region & lung).sum()) / max(int(region.sum()), 1)


def bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _side_zone(mask: np.ndarray) -> tuple[str, str]:
    """Patient's side and lung zone of a region (patient's right is on the image's left)."""
    ys, xs = np.nonzero(mask)
    size = mask.shape[0]
    side = "right" if xs.mean() < size / 2 else "left"
    y = ys.mean() / size
    return side, "upper" if y < 0.4 else "middle" if y < 0.6 else "lower"


# ---------------------------------------------------------------- planning


def plan_pretrain(cfg: Synth, reports: list[iu_reports.IUReport], n_lungs: int, result: BuildResult):
    chosen = reports if cfg.max_reports is None else reports[: cfg.max_reports]
    if cfg.max_reports is not None:
        result.dropped["IU reports beyond synth.max_reports"] = len(reports) - len(chosen)
    jobs, texts = [], {}
    for i, report in enumerate(chosen):
        rng = _rng(cfg.seed, "pretrain", i, 0)
        drawn, not_drawn = fnd.findings_for(report.mesh, rng)
        result.not_drawn.update(not_drawn)
        row_id = f"iu-{report.uid}"
        jobs.append(Job("pretrain", i, row_id, report.uid, int(rng.integers(n_lungs)), tuple(drawn)))
        texts[row_id] = report.text
    return jobs, texts


def plan_pneumothorax(cfg: Synth, table: dict[str, list[str]], fields: list, result: BuildResult):
    size, rng = cfg.image_size, _rng(cfg.seed, "pneumothorax")
    n_pos = round(cfg.pneumothorax.count * cfg.pneumothorax.positive_fraction)
    n_neg = cfg.pneumothorax.count - n_pos
    positives = sorted(k for k, v in table.items() if any(r.strip() != "-1" for r in v))
    negatives = sorted(k for k, v in table.items() if all(r.strip() == "-1" for r in v))
    jobs, outside = [], 0
    for k in rng.permutation(len(positives)):
        if len(jobs) == n_pos:
            break
        image_id, lung = positives[k], int(rng.integers(len(fields)))
        rles = tuple(table[image_id])
        region = siim_region(rles, size)
        if not region.any() or _overlap(region, fields[lung].mask) < MIN_REGION_OVERLAP:
            outside += 1
            continue
        side, _ = _side_zone(region)
        finding = fnd.Finding("pneumothorax", side, "upper", 0.5, f"Pneumothorax/{side}")
        n = len(jobs)
        jobs.append(Job("pneumothorax", n, f"ptx-{n:05d}", f"siim-{image_id}", lung, (finding,), rles))
    result.dropped["SIIM shapes mostly outside the chosen lung field"] = outside
    return _add_negatives("pneumothorax", jobs, n_pos, n_neg, [f"siim-{k}" for k in negatives], len(fields), rng)


def _add_negatives(name: str, jobs: list[Job], n_pos: int, n_neg: int, negatives: list[str], n_lungs: int,
                   rng: np.random.Generator) -> list[Job]:
    """Check the positives were found, then append `n_neg` images without a finding."""
    prefix = {"pneumothorax": "ptx", "opacity": "opa"}[name]
    if len(jobs) < n_pos:
        raise ConfigError(f"synth.{name}: only {len(jobs)} usable source shapes for {n_pos} positives; "
                          "lower count or positive_fraction")
    if n_neg > len(negatives):
        raise ConfigError(f"synth.{name}: {n_neg} negatives asked, the source table has {len(negatives)}")
    for k in sorted(rng.permutation(len(negatives))[:n_neg]):
        n = len(jobs)
        jobs.append(Job(name, n, f"{prefix}-{n:05d}", negatives[k], int(rng.integers(n_lungs)), ()))
    return jobs


def plan_opacity(cfg: Synth, patients: list[rsna.RSNAPatient], fields: list, result: BuildResult):
    size, rng = cfg.image_size, _rng(cfg.seed, "opacity")
    scale = size / rsna.RSNA_SIZE
    n_pos = round(cfg.opacity.count * cfg.opacity.positive_fraction)
    n_neg = cfg.opacity.count - n_pos
    positives = sorted((p for p in patients if p.positive), key=lambda p: p.patient_id)
    negatives = sorted((p for p in patients if not p.positive), key=lambda p: p.patient_id)
    jobs, boxes_outside, patients_outside, clipped = [], 0, 0, 0
    for k in rng.permutation(len(positives)):
        if len(jobs) == n_pos:
            break
        patient, lung = positives[k], int(rng.integers(len(fields)))
        kept, found = [], []
        for b in patient.boxes:
            box = tuple(min(max(v * scale, 0.0), float(size)) for v in b)
            clipped += box != tuple(v * scale for v in b)
            region = box_region(box, size)
            if not region.any() or _overlap(region, fields[lung].mask) < MIN_REGION_OVERLAP:
                boxes_outside += 1
                continue
            side, zone = _side_zone(region)
            kept.append(box)
            found.append(fnd.Finding("opacity", side, zone, 0.66, f"Opacity/lung/{zone}/{side}"))
        if not kept:
            patients_outside += 1
            continue
        n = len(jobs)
        jobs.append(Job("opacity", n, f"opa-{n:05d}", f"rsna-{patient.patient_id}", lung, tuple(found),
                        boxes=tuple(kept)))
    result.dropped["RSNA boxes mostly outside the chosen lung field"] = boxes_outside
    result.dropped["RSNA patients with no usable box"] = patients_outside
    result.dropped["RSNA boxes clipped to the image (kept)"] = clipped
    negative_ids = [f"rsna-{p.patient_id}" for p in negatives]
    return _add_negatives("opacity", jobs, n_pos, n_neg, negative_ids, len(fields), rng)


# ---------------------------------------------------------------- rendering (runs in workers)

_LUNGS: list[np.ndarray] = []
_CTX: dict = {}


def _init_worker(lung_masks: list[np.ndarray], out: str, seed: int, size: int) -> None:
    global _LUNGS
    _LUNGS = lung_masks
    _CTX.update(out=Path(out), seed=seed, size=size)


def _init_pool_worker(*args) -> None:
    # one BLAS thread per render process: with N processes on N cores, BLAS's own threads only spin
    # against each other (measured here: twice the CPU time for the same images)
    threadpool_limits(1)
    _init_worker(*args)


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG")


def render_job(job: Job) -> dict:
    """Render one image and its masks to disk; return the row's content (no split yet)."""
    out, size = _CTX["out"] / job.dataset, _CTX["size"]
    specs = []
    for k, f in enumerate(job.findings):
        region = None
        if job.siim_rles:
            region = siim_region(job.siim_rles, size)
        elif job.boxes:
            region = box_region(job.boxes[k], size)
        specs.append(FindingSpec(f.kind, f.side, f.zone, f.severity, region))
    rad = render_radiograph(_LUNGS[job.lung], specs, _rng(_CTX["seed"], job.dataset, job.index, 1))
    image_rel = f"images/{job.row_id}.png"
    _save_png(rad.image, out / image_rel)
    entries, union, empty = [], np.zeros((size, size), dtype=bool), 0
    for k, (f, mask) in enumerate(zip(job.findings, rad.masks, strict=True)):
        if not mask.any():
            empty += 1
            continue
        entry = {"kind": f.kind, "term": f.term, "side": f.side, "zone": f.zone, "severity": f.severity,
                 "box": bbox(mask)}
        if job.dataset == "pretrain":  # each finding its own mask, for grounding each phrase
            entry["mask"] = f"masks/{job.row_id}_{k}.png"
            _save_png(mask.astype(np.uint8) * 255, out / entry["mask"])
        union |= mask
        entries.append(entry)
    row = {"id": job.row_id, "image": image_rel, "patient_id": job.patient_id, "study_id": job.row_id,
           "boxes": [[*e["box"], e["kind"]] for e in entries], "findings": entries}
    if job.dataset != "pretrain":  # segmentation truth: the union, an empty mask for negatives
        row["mask"] = f"masks/{job.row_id}.png"
        _save_png(union.astype(np.uint8) * 255, out / row["mask"])
    return {"row": row, "kinds": [e["kind"] for e in entries], "empty_masks": empty}


# ---------------------------------------------------------------- assembling


def _check_out(out: Path) -> None:
    """Never delete what g2d did not write: an existing output must be an earlier SynthCXR."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise DataError(f"{out}: exists and is not a SynthCXR folder (no {MARKER}); "
                        "choose another paths.synthcxr or empty it")


def _prepare_out(out: Path) -> None:
    _check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    # claim the folder first, so an interrupted render can be re-run over its own leftovers
    (out / MARKER).write_text(json.dumps({"status": "rendering"}) + "\n")
    for name in SETS:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    for name in SETS:
        (out / name / "images").mkdir(parents=True)
        (out / name / "masks").mkdir(parents=True)


def _render_all(jobs: list[Job], lung_masks: list[np.ndarray], cfg: Synth, out: Path, reporter: Reporter):
    advance = reporter.task("render SynthCXR", len(jobs))
    workers = cfg.workers or os.cpu_count() or 1
    init_args = (lung_masks, str(out), cfg.seed, cfg.image_size)
    if workers == 1 or len(jobs) < 64:
        _init_worker(*init_args)
        results = []
        with threadpool_limits(1):
            for job in jobs:
                results.append(render_job(job))
                advance(1)
        return results
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(workers, mp_context=mp.get_context(method), initializer=_init_pool_worker,
                             initargs=init_args) as pool:
        results = []
        for res in pool.map(render_job, jobs, chunksize=16):
            results.append(res)
            advance(1)
    return results


def _finish_set(name: str, rows: list[dict], cfg: Synth, out: Path, reporter: Reporter) -> dict:
    folder = out / name
    df = pd.DataFrame(rows)
    seed = cfg.seed + _SET_CODE[name]
    df = splits.add_splits(df, STRATUM[name], cfg.splits.val, cfg.splits.test, seed)
    train = df[df["split"] == "train"]
    chosen = splits.nested_fractions(list(train["id"]), list(train[STRATUM[name]].astype(str)),
                                     cfg.splits.fractions, seed)
    fractions = splits.write_fractions(folder, chosen)
    mf.write_manifest(df, folder)
    df = mf.read_manifest(folder)
    advance = reporter.task(f"hash {name}", len(mf.referenced_files(df)))
    labels = mf.label_columns(df)
    return {
        "name": name,
        "rows": len(df),
        "image_size": cfg.image_size,
        "seed": cfg.seed,
        "splits": {s: int((df["split"] == s).sum()) for s in mf.SPLITS},
        "patients": int(df["patient_id"].nunique()),
        "prevalence": {c: round(float(df[c].fillna(0).eq(1).mean()), 4) for c in labels},
        "positives": {c: int(df[c].fillna(0).eq(1).sum()) for c in labels},
        "fractions": fractions,
        "sha256": mf.record_hashes(folder, advance),
    }


def build(cfg: Synth, sources_dir: Path, out: Path, reporter: Reporter = silent) -> BuildResult:
    """Render SynthCXR into `out` from the fetched sources in `sources_dir`."""
    result = BuildResult(out)
    _check_out(out)
    lung_set = lungs.load_lung_fields(embedded.source_path(sources_dir, embedded.LUNG_MASKS), cfg.image_size)
    fields = lung_set.fields
    for reason, n in lung_set.dropped.items():
        result.dropped[f"lung masks: {reason}"] = n
    if not fields:
        raise DataError(f"{sources_dir / embedded.LUNG_MASKS.name}: no usable lung-field mask")
    report_set = iu_reports.read_reports(embedded.source_path(sources_dir, embedded.REPORTS))
    for reason, n in report_set.dropped.items():
        result.dropped[f"IU reports: {reason}"] = n
    table = siim.read_rle_table(embedded.source_path(sources_dir, embedded.SIIM_RLE))
    patients = rsna.read_labels(embedded.source_path(sources_dir, embedded.RSNA_LABELS))

    pre_jobs, texts = plan_pretrain(cfg, report_set.reports, len(fields), result)
    jobs = pre_jobs + plan_pneumothorax(cfg, table, fields, result) + plan_opacity(cfg, patients, fields, result)

    _prepare_out(out)
    rendered = _render_all(jobs, [f.mask for f in fields], cfg, out, reporter)

    empty = Counter()
    rows: dict[str, list[dict]] = {name: [] for name in SETS}
    for job, res in zip(jobs, rendered, strict=True):
        row = res["row"]
        empty[job.dataset] += res["empty_masks"]
        if job.dataset == "pretrain":
            row["report"] = texts[job.row_id]
            row.update(fnd.labels_for(res["kinds"]))
        else:
            row[STRATUM[job.dataset]] = int(bool(res["kinds"]))
        rows[job.dataset].append(row)
    for name in SETS:
        result.dropped[f"{name}: findings whose drawn mask was empty"] = empty[name]
        result.info[name] = _finish_set(name, rows[name], cfg, out, reporter)
        mf.write_info(out / name, result.info[name])
    summary = {"status": "complete", "sets": result.info, "dropped": result.dropped,
               "mesh_heads_not_drawn": dict(result.not_drawn)}
    (out / MARKER).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return result
