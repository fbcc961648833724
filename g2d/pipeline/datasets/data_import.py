"""`g2d data import`: a downloaded dataset in its official layout -> a validated dataset folder, recorded as
an MLflow run of the `g2d-data` experiment (protocol name and hash, counts, the import report)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from g2d import tracking
from g2d.config import Params
from g2d.data import importing
from g2d.data import manifest as mf
from g2d.errors import DataError
from g2d.pipeline.datasets import import_sheet
from g2d.progress import Reporter, silent


@dataclass
class ImportOutcome:
    result: importing.ImportResult
    run_id: str
    seconds: float


def options(params: Params, images: Path | None = None, reports: Path | None = None) -> importing.Options:
    p = params.importing
    return importing.Options(image_size=p.image_size, workers=p.workers, shard_size=p.shard_size,
                             max_failures=p.max_failures, fractions=p.fractions, seed=p.seed,
                             uncertain=dict(p.uncertain), images=images, reports=reports)


def check(source: str, protocol: str | None) -> str:
    """The protocol's label (NAME.vN) for this source, or the error a bad name or source gives."""
    return importing.protocol_for(source, protocol).label


def run(params: Params, source: str, src: Path, out: Path, protocol: str | None = None,
        images: Path | None = None, reports: Path | None = None, reporter: Reporter = silent) -> ImportOutcome:
    chosen = importing.protocol_for(source, protocol)  # fail on a bad name before opening a run
    config = {"source": source, "src": str(Path(src).resolve()), "out": str(Path(out).resolve()),
              "protocol": chosen.label, "importing": params.importing.model_dump(mode="json")}
    with tracking.start_run("data", config=config, uri=params.tracking.uri,
                            tags={"g2d.import_source": source, **mf.protocol_tags(chosen.record())}) as tr:
        started = time.perf_counter()
        try:
            result = importing.run(source, Path(src), Path(out), chosen.label, options(params, images, reports),
                                   reporter.task)
        except DataError:
            if (Path(out) / importing.REPORT).is_file():  # a failed import's list of failures, on the run too
                tr.log_artifact(Path(out) / importing.REPORT)
            raise
        seconds = time.perf_counter() - started
        tr.set_tag("g2d.data_hash", result.sha256)
        tr.log_metrics({"rows": result.rows, "failed": len(result.failures),
                        "dropped": sum(result.dropped.values()), "seconds": seconds,
                        **{f"rows_{s}": n for s, n in result.splits.items()}})
        tr.log_dict(importing.summary(result), "import_summary.json")
        tr.log_artifact(result.report)
        sheet = import_sheet.write(result.folder, result.folder / "contact_sheet.png",
                                   title=f"{source} ({chosen.label}): stored images, masks (cyan), boxes (orange)")
        tr.log_artifact(sheet, "figures")
        tr.log_dataset(f"{source}-{Path(out).name}", source=str(Path(out).resolve() / mf.MANIFEST),
                       digest=result.sha256, context="import", tags={"protocol": chosen.label})
        return ImportOutcome(result, tr.run_id, seconds)
