"""The `synth` stage: render SynthCXR, draw its contact sheets, write `metrics/data.json`, and
record it all in an MLflow run of the `g2d-data` experiment with each dataset logged as input."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from g2d import tracking
from g2d.config import Params, dump_yaml, resolve_path, to_dict
from g2d.data import manifest as mf
from g2d.data.sources import embedded
from g2d.data.synthcxr import build, contact_sheet
from g2d.progress import Reporter, silent


@dataclass
class SynthOutcome:
    out: Path
    metrics_path: Path
    data_hash: str
    run_id: str
    metrics: dict
    seconds: float


def combined_hash(info: dict[str, dict]) -> str:
    """One hash for the rendered dataset: the per-set hashes in set order."""
    return hashlib.sha256("".join(info[name]["sha256"] for name in build.SETS).encode()).hexdigest()


def run(params: Params, reporter: Reporter = silent) -> SynthOutcome:
    root = tracking.project_root()
    sources = resolve_path(root, params.paths.sources)
    out = resolve_path(root, params.paths.synthcxr)
    for source in embedded.SOURCES:  # fail before opening a run if the sources are not fetched
        embedded.verify(sources / source.name, source)
    source_hashes = {s.name: s.sha256 for s in embedded.SOURCES}
    with tracking.start_run("data", config=to_dict(params), uri=params.tracking.uri,
                            tags={"g2d.source_sha256": hashlib.sha256(
                                json.dumps(source_hashes, sort_keys=True).encode()).hexdigest()}) as tr:
        started = time.perf_counter()
        result = build.build(params.synth, sources, out, reporter)
        seconds = time.perf_counter() - started
        data_hash = combined_hash(result.info)
        tr.set_tag("g2d.data_hash", data_hash)

        dump_yaml(params, out / "params.yaml", ("paths", "synth"))  # the effective config beside the output
        sheet = contact_sheet.write_pretrain_sheet(out / "pretrain", out / "contact_sheet.png",
                                                   params.synth.contact_sheet)
        seg_sheet = contact_sheet.write_segmentation_sheet(
            {name: out / name for name in build.SETS[1:]}, out / "contact_sheet_segmentation.png")

        metrics = {  # deterministic (no timings), so a re-run on a fresh clone reproduces dvc.lock exactly
            "data_hash": data_hash,
            "sets": {name: {k: info[k] for k in ("rows", "patients", "splits", "positives", "sha256")}
                     for name, info in result.info.items()},
            "dropped": result.dropped,
            "mesh_heads_not_drawn": dict(result.not_drawn.most_common()),
        }
        metrics_path = resolve_path(root, params.paths.metrics) / "data.json"
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")

        flat = {"render_seconds": seconds}
        for name, info in result.info.items():
            flat[f"{name}.rows"] = info["rows"]
            flat.update({f"{name}.{split}": n for split, n in info["splits"].items()})
            flat.update({f"{name}.positives.{c}": n for c, n in info["positives"].items()})
        flat.update({f"dropped.{_metric_key(k)}": v for k, v in result.dropped.items()})
        tr.log_metrics(flat)
        for source in embedded.SOURCES:
            tr.log_dataset(source.name, source=str(sources / source.name), digest=source.sha256,
                           context="source", tags={"what": source.what})
        for name, info in result.info.items():
            folder = out / name
            df = mf.read_manifest(folder)
            tr.log_dataset(f"synthcxr-{name}", source=str(folder / mf.MANIFEST), digest=info["sha256"],
                           context="output", schema={c: str(t) for c, t in df.dtypes.items()},
                           profile={"rows": info["rows"], "splits": info["splits"]})
            tr.log_artifact(folder / mf.DATASET_INFO, f"datasets/{name}")
            tr.log_artifact(folder / mf.MANIFEST, f"datasets/{name}")
        tr.log_artifact(sheet, "figures")
        tr.log_artifact(seg_sheet, "figures")
        tr.log_artifact(metrics_path)
        tr.log_artifact(out / build.MARKER)
        return SynthOutcome(out, metrics_path, data_hash, tr.run_id, metrics, seconds)


def _metric_key(reason: str) -> str:
    """MLflow metric names allow letters, digits and _-./ and spaces; keep them short and stable."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in reason).replace(" ", "_")[:200]
