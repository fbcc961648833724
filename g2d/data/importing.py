"""Turn a downloaded dataset, in the layout it is distributed in, into a validated g2d dataset folder.

Each source module (`g2d/data/sources/<name>.py`) knows its official files and yields one `Item` per
image: where the image is, its patient, its official partition ("pool"), labels, boxes and how to draw
its mask. Everything else is shared and lives here:

- the split protocol (`g2d/data/protocols`) places each image in train / val / test;
- images are decoded (DICOM, PNG, JPG via `images.read_image`) and stored resized, as 8-bit PNGs, in
  shards of `importing.shard_size` images (`images/<shard>/<id>.png`); worker processes do the decoding,
  the main process only ever holds one shard's rows, so pixels never accumulate in memory;
- each finished shard is journalled (`.import/shard-NNNNN.jsonl`), so an interrupted import resumes
  where it stopped when run again with the same arguments;
- an image that fails to decode is listed, with its file and error, in `import_report.json`, never
  skipped silently, and the import fails when more than `importing.max_failures` of the images do;
- report text is made ASCII (`text.to_ascii`: typographic quotes, dashes and spaces spelled in ASCII, accents
  dropped), as `validate` requires; characters with no ASCII spelling are removed and counted
  (`report_text` in `import_report.json`, and among the dropped);
- the manifest, nested label fractions and `dataset.json` (with the protocol's name, version and hash)
  are written last, and the folder is validated.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import json
import multiprocessing as mp
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from g2d.data import manifest as mf
from g2d.data import protocols, splits, text
from g2d.data.images import read_image, to_uint8
from g2d.data.rle import decode_rle
from g2d.errors import DataError

STATE = ".import"
REPORT = "import_report.json"
# source name -> module under g2d/data/sources holding its IMPORTER
SOURCES = {
    "mimic-cxr": "mimic_cxr", "siim": "siim", "rsna": "rsna", "chexpert": "chexpert", "covidx": "covidx",
    "object-cxr": "object_cxr", "ms-cxr": "ms_cxr", "chestxray14": "chestxray14",
}
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # an image id is a file name: no '/', no '..', no spaces
BOX_SLACK = 1.0  # pixels a box may overhang the image (annotation rounding) before it is an error


@dataclass(slots=True)
class Item:
    """One image of a source, as its official files describe it (coordinates in the source's pixels)."""

    id: str  # unique within the dataset, safe as a file name
    image: Path  # the source image file
    patient_id: str
    pool: str  # the official partition it comes from (train / valid / test / ...)
    where: str  # file and row that describe it, for messages
    study_id: str = ""
    source_id: str = ""  # the dataset's own name for the image
    labels: dict[str, int | None] = field(default_factory=dict)  # 1 / 0 / -1 / None (blank)
    boxes: list[tuple] = field(default_factory=list)  # (x0, y0, x1, y1, label[, where: its own file and row])
    mask: str | None = None  # "boxes" (filled boxes), "rle" (SIIM), "shapes" (Object-CXR), "empty"
    rle: list[str] = field(default_factory=list)
    rle_size: tuple[int, int] | None = None  # (height, width) the RLE is defined on; None = the image's
    shapes: list[tuple[str, tuple[float, ...]]] = field(default_factory=list)  # (rectangle|ellipse|polygon, xy)
    report: str | None = None
    report_file: Path | None = None  # read (and sectioned) in the worker by the source's read_report
    findings: list[dict] = field(default_factory=list)  # {"phrase", "kind", "box": [x0, y0, x1, y1]}
    missing: dict | None = None  # `missing_file(...)` when a file it needs is not there: still placed by the
    # protocol (so which files are present never changes anyone's split), then listed as a failure
    split_key: str = field(default="", repr=False)  # what the protocol groups and orders by when it is not
    # patient_id: the raw patient id of a source whose manifest holds a pseudonym (`pseudonym`). In memory only:
    # never written, logged or put in a message (repr=False keeps it out of the import's fingerprint too)


@dataclass
class Scan:
    items: list[Item]
    dropped: Counter = field(default_factory=Counter)  # reason -> count, reported with the import


def safe_id(name: str) -> str:
    """A source's file name as an image id: characters other than letters, digits, '.', '_', '-' become '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip("._-") or "_"


def pseudonym(raw_patient_id: str, domain: str) -> str:
    """A stable stand-in for a patient id read from a DICOM header, so the identifier itself never reaches
    the manifest, dataset.json or MLflow: "pid-" and 16 hex digits of SHA-256 over a per-source domain and the
    id. The same patient always gets the same pseudonym (patient-level splits and the leak check still hold).
    It is not a secret: whoever can list candidate ids can recompute it, so the manifest stays as private as
    the images it points at."""
    return "pid-" + hashlib.sha256(f"g2d/{domain}/PatientID\0{raw_patient_id}".encode()).hexdigest()[:16]


def missing_file(path: Path, where: str, what: str = "image") -> dict:
    """A failure entry for a file a source's table lists but the folder lacks (set it as `Item.missing`)."""
    return {"file": str(path), "where": where, "error": f"{what} listed here does not exist"}


def read_table(path: Path, expected: tuple[str, ...], sep: str = ",", header: bool = True,
               names: tuple[str, ...] | None = None) -> pd.DataFrame:
    """A source's CSV / list file as strings (blank = ""), with column names stripped of the stray spaces some
    official files carry; missing columns are an error that names what is expected and what was found."""
    if not path.is_file():
        raise DataError(f"{path}: missing; the source's official layout has it")
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, header=0 if header else None,
                         names=list(names) if names else None, skipinitialspace=True)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError, OSError) as e:
        raise DataError(f"{path}: not a readable table ({e})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in expected if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected {list(expected)}, found {list(df.columns)}")
    return df


def row_where(path: Path, index: int) -> str:
    """A data row as the line a user sees in the file (header = line 1)."""
    return f"{path} row {index + 2}"


@dataclass(frozen=True)
class Importer:
    name: str
    default_protocol: str
    labels: tuple[str, ...]  # label columns of the manifest
    columns: tuple[str, ...]  # core columns it fills besides id / image / patient_id / split / source_id
    scan: Callable[..., Scan]  # scan(src, options) -> Scan
    layout: str  # what --src must hold, for help and errors
    read_report: Callable[[Path], str | None] | None = None  # module-level, so workers can call it


@dataclass(frozen=True)
class Options:
    """What a scan and the conversion need besides --src (from params.importing and the CLI)."""

    image_size: int = 512
    workers: int = 0
    shard_size: int = 1000
    max_failures: float = 0.01
    fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    seed: int = 42
    uncertain: dict[str, str] = field(default_factory=dict)  # label -> ones | zeros | keep
    images: Path | None = None  # where the image files are, when not under --src (MS-CXR: MIMIC-CXR-JPG)
    reports: Path | None = None  # where the report files are, when not under --src (MIMIC-CXR)


@dataclass
class ImportResult:
    folder: Path
    source: str
    protocol: protocols.Protocol
    rows: int
    splits: dict[str, int]
    dropped: dict[str, int]
    failures: list[dict]
    sha256: str
    report: Path
    resumed_shards: int


def importer(name: str) -> Importer:
    if name not in SOURCES:
        import difflib

        close = difflib.get_close_matches(name, list(SOURCES), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise DataError(f"unknown source {name!r}: {hint}sources are {', '.join(SOURCES)}")
    return importlib.import_module(f"g2d.data.sources.{SOURCES[name]}").IMPORTER


def protocol_for(source: str, spec: str | None) -> protocols.Protocol:
    """The protocol `spec` names (default: the source's own), refused when written for another source."""
    chosen = protocols.load(spec or importer(source).default_protocol)
    if chosen.source != source:
        raise DataError(f"protocol {chosen.label} is for {chosen.source}, not {source}; protocols for "
                        f"{source}: {', '.join(protocols.for_source(source))}")
    return chosen


def uncertain_value(value: int | None, label: str, policy: dict[str, str]) -> int | None:
    """-1 (uncertain) under the label's policy: U-ones -> 1, U-zeros -> 0, keep -> -1 (left out of losses)."""
    if value != -1:
        return value
    rule = policy.get(label, "keep")
    return {"ones": 1, "zeros": 0, "keep": -1}[rule]


def run(name: str, src: Path, out: Path, protocol_spec: str | None, options: Options,
        progress: Callable[[str, int], Callable[[int], None]] | None = None) -> ImportResult:
    """Import `src` (the source's official layout) into the dataset folder `out`."""
    source = importer(name)
    protocol = protocol_for(name, protocol_spec)
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"--src {src} is not a folder; it must hold {source.layout}")
    out = Path(out)
    if (out / mf.MANIFEST).exists() and not (out / STATE).is_dir():
        raise DataError(f"{out} already holds a dataset ({mf.MANIFEST}); remove it or import into another --out")

    scan = source.scan(src, options)
    items, dropped, missing = _place(scan, protocol, f"{source.name} import from {src}")
    if not items and not missing:
        raise DataError(f"{src}: no images to import ({dict(dropped) or 'the source lists none'}); it must hold "
                        f"{source.layout}")
    shards = [items[k:k + options.shard_size] for k in range(0, len(items), options.shard_size)]
    state = out / STATE
    fingerprint = _fingerprint(source, protocol, options, src, items)
    resumed = _prepare(state, fingerprint, out)

    advance = progress(f"import {source.name}", len(items)) if progress else (lambda n=1: None)
    pending = []
    for k, shard in enumerate(shards):
        if (state / _shard_name(k)).is_file():
            advance(len(shard))
        else:
            pending.append(k)
    _convert_shards(shards, pending, out, source, options, advance)

    failures, worker_drops, report_text = list(missing), Counter(), _ReportText()
    for row in _journal(state, len(shards)):  # what the workers failed on or left out, before any manifest
        if "failed" in row:
            failures.append(row["failed"])
        elif "dropped" in row:
            worker_drops[row["dropped"]] += 1
        elif row.get("dropped_boxes"):
            worker_drops["boxes with zero width or height (left out of boxes and masks)"] += row["dropped_boxes"]
        if "report_text" in row:
            report_text.add(row["report_text"])
    if report_text.removed:
        worker_drops[REMOVED_CHARACTERS] += sum(report_text.removed.values())
    listed = len(items) + len(missing) + sum(dropped.values())  # every image the source's tables name
    dropped.update(worker_drops)
    attempted = len(items) + len(missing)
    report = {"source": source.name, "src": str(src.resolve()), "protocol": protocol.record(),
              "listed": listed, "dropped": dict(sorted(dropped.items())),
              "attempted": attempted, "failed": len(failures), "failures": failures,
              "max_failures": options.max_failures}
    if report_text.reports:
        report["report_text"] = report_text.record()
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    if len(failures) > options.max_failures * attempted:
        raise DataError(
            f"{src}: {len(failures)} of {attempted} images failed to import ({len(failures) / attempted:.1%}, more "
            f"than importing.max_failures = {options.max_failures:.1%}), e.g. {failures[0]['file']}: "
            f"{failures[0]['error']}; every failure is listed in {out / REPORT}")

    rows_written, split_counts, strata = _write_manifest(out, source, state, len(shards))
    info = _finish(out, source, protocol, options, split_counts, strata, dropped, len(failures))
    problems = mf.validate(out, workers=options.workers)
    if not problems.ok:
        raise DataError(f"{out}: the imported dataset does not validate: "
                        + "; ".join(str(p) for p in problems.problems[:3]) + f" (run `g2d data validate {out}`)")
    shutil.rmtree(state)  # only now: a dataset that does not validate can be re-imported in place
    return ImportResult(out, source.name, protocol, rows_written, split_counts, dict(sorted(dropped.items())),
                        failures, info["sha256"], out / REPORT, resumed)


# ---------------------------------------------------------------- placing images in splits


def _place(scan: Scan, protocol: protocols.Protocol, where: str) -> tuple[list[Item], Counter, list[dict]]:
    """The items the protocol places, each with its split in `pool`; what was left out, by reason; and the
    failure entries of placed items whose files are missing."""
    items, dropped = scan.items, Counter(scan.dropped)
    seen: dict[str, str] = {}
    for item in items:
        if not SAFE_ID.fullmatch(item.id):  # ids become file names under images/: never a path
            raise DataError(f"{item.where}: image id {item.id!r} is not a safe file name (letters, digits, '.', '_', "
                            "'-'); the source module must sanitise it")
        if item.id in seen:
            raise DataError(f"{item.where}: image id {item.id!r} appears twice (also at {seen[item.id]}); "
                            "remove the duplicate row")
        seen[item.id] = item.where
    pools = {d.pool for d in protocol.splits.values()}
    for pool, n in Counter(i.pool for i in items if i.pool not in pools).items():
        dropped[f"in official partition {pool!r}, which protocol {protocol.label} does not use"] += n
    items = [i for i in items if i.pool in pools]  # a subset is drawn only from what the protocol places
    if protocol.subset is not None:
        columns = (*protocol.subset.one_of, *protocol.subset.others)
        keep = set(protocols.select_subset(protocol.subset, [i.id for i in items],
                                           {c: [i.labels.get(c) for i in items] for c in columns}, protocol.seed,
                                           f"{where}, protocol {protocol.label}"))
        dropped[f"not in protocol {protocol.label}'s subset"] += len(items) - len(keep)
        items = [i for i in items if i.id in keep]
    placed = protocols.assign(protocol, [i.id for i in items], [i.split_key or i.patient_id for i in items],
                              [i.pool for i in items], where)
    missing = [i.missing for i in sorted(items, key=lambda i: i.id) if i.missing is not None]
    kept = sorted((i for i in items if i.missing is None), key=lambda i: i.id)
    for item in kept:
        item.pool = placed[item.id]  # from here on, the split
    return kept, dropped, missing


# ---------------------------------------------------------------- resumable, parallel conversion


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.jsonl"


def _fingerprint(source: Importer, protocol: protocols.Protocol, options: Options, src: Path,
                 items: list[Item]) -> dict:
    """Everything that changes what a shard holds. Not the worker count (it never changes the output) nor
    max_failures: after an import fails the threshold, a rerun with a higher one reuses every shard."""
    content = hashlib.sha256()
    for item in items:  # everything a shard's rows are made of: a changed annotation is a different import
        content.update(repr(item).encode() + b"\n")
    ids = content.hexdigest()
    return {"source": source.name, "src": str(src.resolve()), "protocol": protocol.label,
            "images": str(options.images), "reports": str(options.reports),
            "protocol_sha256": protocol.sha256, "image_size": options.image_size,
            "shard_size": options.shard_size, "uncertain": dict(sorted(options.uncertain.items())),
            "items": len(items), "items_sha256": ids}


def _prepare(state: Path, fingerprint: dict, out: Path) -> int:
    """Start or resume: an unfinished import of other settings is never mixed into this one."""
    path = state / "state.json"
    if path.is_file():
        before = json.loads(path.read_text())
        differ = sorted(k for k in set(before) | set(fingerprint) if before.get(k) != fingerprint.get(k))
        if differ:
            raise DataError(f"{out} holds an unfinished import with other settings ({', '.join(differ)} differ); "
                            f"rerun it with the same arguments to resume, or remove {out} to start over")
        return len(list(state.glob("shard-*.jsonl")))
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} is not empty; import into a new or empty folder")
    state.mkdir(parents=True)
    path.write_text(json.dumps(fingerprint, indent=2) + "\n")
    return 0


def _convert_shards(shards: list[list[Item]], pending: list[int], out: Path, source: Importer,
                    options: Options, advance: Callable[[int], None]) -> None:
    jobs = ((k, item) for k in pending for item in shards[k])
    worker_args = (str(out), options.image_size, source.read_report, source.labels, options.uncertain)
    workers = options.workers or os.cpu_count() or 1
    total = sum(len(shards[k]) for k in pending)
    if workers == 1 or total < 32:
        _init(*worker_args)
        results: Iterator[tuple[int, dict]] = map(_convert_job, jobs)
        _collect(results, shards, pending, out / STATE, advance)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(workers, initializer=_init, initargs=worker_args) as pool:
        _collect(pool.imap(_convert_job, jobs, chunksize=4), shards, pending, out / STATE, advance)


def _collect(results: Iterator[tuple[int, dict]], shards, pending: list[int], state: Path, advance) -> None:
    """Write each shard's journal once all its images are done (atomically: a killed import leaves no
    half journal, so the shard is redone on resume)."""
    waiting = {k: [] for k in pending}
    for k, row in results:
        if "error" in row:
            raise DataError(row["error"])
        waiting[k].append(row)
        advance(1)
        if len(waiting[k]) == len(shards[k]):
            tmp = state / (_shard_name(k) + ".part")
            tmp.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in waiting.pop(k)))
            tmp.replace(state / _shard_name(k))


def _journal(state: Path, n_shards: int) -> Iterator[dict]:
    for k in range(n_shards):
        with open(state / _shard_name(k)) as f:
            for line in f:
                yield json.loads(line)


_WORKER: dict = {}


def _init(out: str, size: int, read_report, labels, uncertain) -> None:
    _WORKER.update(out=Path(out), size=size, read_report=read_report, labels=labels, uncertain=uncertain)


def _convert_job(job: tuple[int, Item]) -> tuple[int, dict]:
    k, item = job
    try:
        return k, convert(item, k, _WORKER["out"], _WORKER["size"], _WORKER["read_report"], _WORKER["labels"],
                          _WORKER["uncertain"])
    except _ItemError as e:
        return k, {"error": str(e)}
    except Exception as e:  # a decoder or drawing library failing on one file: listed, never a silent skip
        return k, {"failed": {"file": str(item.image), "where": item.where, "error": f"{type(e).__name__}: {e}"}}


REMOVED_CHARACTERS = ("non-ASCII characters removed from reports (no ASCII spelling; see report_text in "
                      "import_report.json)")


@dataclass
class _ReportText:
    """What making the reports ASCII changed (g2d.data.text.to_ascii), summed over the workers' rows."""

    reports: int = 0
    replaced: int = 0
    removed: Counter = field(default_factory=Counter)

    def add(self, entry: dict) -> None:
        self.reports += 1
        self.replaced += entry.get("replaced", 0)
        self.removed.update(entry.get("removed", {}))

    def record(self) -> dict:
        return {"rows whose report changed": self.reports,
                "characters spelled in ASCII (quotes, dashes, spaces, accents)": self.replaced,
                "characters removed": {text.describe(c): n for c, n in sorted(self.removed.items())}}


class _ItemError(Exception):
    """A problem in the source's annotations (not a file that fails to decode): the import stops."""


def convert(item: Item, shard: int, out: Path, size: int, read_report=None, labels=(), uncertain=None) -> dict:
    """Decode, resize and store one image (and its mask); the manifest row, or {"failed": ...}."""
    report = item.report
    if item.report_file is not None and read_report is not None:
        try:
            report = read_report(item.report_file)
        except DataError as e:
            return {"failed": {"file": str(item.report_file), "where": item.where, "error": str(e)}}
        if not report:
            return {"dropped": "report has neither a findings nor an impression section"}
    ascii_report = text.to_ascii(report) if report else None  # the text encoders expect English ASCII
    if ascii_report is not None:
        report = ascii_report.text
        if not report:
            return {"dropped": "report has no text left once made ASCII"}
    try:
        pixels = read_image(item.image)
    except DataError as e:
        return {"failed": {"file": str(item.image), "where": item.where, "error": str(e)}}
    height, width = pixels.shape
    scale = min(1.0, size / max(height, width))
    new = (max(1, round(width * scale)), max(1, round(height * scale)))
    sx, sy = new[0] / width, new[1] / height
    rel = f"images/{shard:05d}/{item.id}.png"
    _save(Image.fromarray(to_uint8(pixels)).resize(new, Image.Resampling.BILINEAR), out / rel)

    flat = [b for b in item.boxes if b[0] == b[2] or b[1] == b[3]]  # a point or a line: nothing to detect
    boxes = [_box(b[:4], width, height, b[5] if len(b) > 5 else item.where) + [b[4]] for b in item.boxes
             if b not in flat]
    row = {"id": item.id, "image": rel, "patient_id": item.patient_id, "study_id": item.study_id,
           "split": item.pool, "source_id": item.source_id or item.id, "report": report,
           "boxes": [[_r(b[0] * sx), _r(b[1] * sy), _r(b[2] * sx), _r(b[3] * sy), b[4]] for b in boxes]}
    if item.findings:
        row["findings"] = [{**f, "box": [_r(v * s) for v, s in zip(_box(f["box"], width, height, item.where),
                                                                     (sx, sy, sx, sy), strict=True)]}
                           for f in item.findings]
    if item.mask is not None:
        mask = _mask(item, (width, height), new, [b[:4] for b in boxes])
        row["mask"] = f"masks/{shard:05d}/{item.id}.png"
        _save(Image.fromarray(mask.astype(np.uint8) * 255), out / row["mask"])
        row["positive"] = bool(mask.any())
    row["labels"] = {c: uncertain_value(item.labels.get(c), c, uncertain or {}) for c in labels}
    if flat:
        row["dropped_boxes"] = len(flat)
    if ascii_report is not None and (ascii_report.replaced or ascii_report.removed):
        row["report_text"] = {"replaced": ascii_report.replaced, "removed": dict(ascii_report.removed)}
    return row


def _r(v: float) -> float:
    return round(float(v), 2)


def _box(box, width: int, height: int, where: str) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x0 < x1 and y0 < y1):
        raise _ItemError(f"{where}: box {[x0, y0, x1, y1]} is empty or inverted (x0 < x1 and y0 < y1 needed)")
    if x0 < -BOX_SLACK or y0 < -BOX_SLACK or x1 > width + BOX_SLACK or y1 > height + BOX_SLACK:
        raise _ItemError(f"{where}: box {[x0, y0, x1, y1]} lies outside the {width} x {height} image; fix the row "
                         "or remove it")
    return [max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)]


def _mask(item: Item, size: tuple[int, int], new: tuple[int, int], boxes: list[list[float]]) -> np.ndarray:
    """The item's mask at the stored image's size."""
    if item.mask == "rle":
        h, w = item.rle_size or (size[1], size[0])
        if (w, h) != size:
            raise _ItemError(f"{item.where}: the RLE mask is defined on {w} x {h} but {item.image} is "
                             f"{size[0]} x {size[1]}; is it the right image?")
        full = np.zeros((h, w), dtype=bool)
        for n, rle in enumerate(item.rle):
            try:
                full |= decode_rle(rle, h, w, where=f"{item.where} (row {n + 1} of this image)")
            except DataError as e:
                raise _ItemError(str(e)) from None
        return downsample_mask(full, new)
    canvas = Image.new("1", new, 0)
    draw = ImageDraw.Draw(canvas)
    sx, sy = new[0] / size[0], new[1] / size[1]
    if item.mask == "boxes":
        for box in boxes:
            draw.rectangle(_pixel_corners(box, sx, sy), fill=1)
    elif item.mask == "shapes":
        for kind, xy in item.shapes:
            xs, ys = xy[0::2], xy[1::2]
            if min(xs) == max(xs) or min(ys) == max(ys):
                continue  # a point or a line, as its box (dropped and counted with the boxes)
            if kind == "polygon":
                draw.polygon([(x * sx, y * sy) for x, y in zip(xs, ys, strict=True)], fill=1)
            else:  # rectangle / ellipse: its two corners, as a box
                corners = _pixel_corners([min(xs), min(ys), max(xs), max(ys)], sx, sy)
                (draw.rectangle if kind == "rectangle" else draw.ellipse)(corners, fill=1)
    return np.asarray(canvas, dtype=bool)


def _pixel_corners(box, sx: float, sy: float) -> list[float]:
    """A box [x0, y0, x1, y1) (x1, y1 exclusive) scaled to the stored image as the inclusive pixel corners
    Pillow draws; a box under a pixel still covers the pixel it starts in."""
    x0, y0 = box[0] * sx, box[1] * sy
    return [x0, y0, max(x0, box[2] * sx - 1), max(y0, box[3] * sy - 1)]


def downsample_mask(full: np.ndarray, new: tuple[int, int]) -> np.ndarray:
    """A full-resolution mask at the stored size: pixels at least half covered; a region too small for that
    keeps the pixels it touches, so a positive image never ends with an empty mask."""
    if full.shape[::-1] == new:
        return full
    coverage = np.asarray(Image.fromarray(full.astype(np.float32)).resize(new, Image.Resampling.BOX))
    mask = coverage >= 0.5
    return mask if mask.any() or not full.any() else coverage > 0


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    image.save(tmp, format="PNG")
    tmp.replace(path)


# ---------------------------------------------------------------- manifest, fractions, dataset.json


def _write_manifest(out: Path, source: Importer, state: Path, n_shards: int):
    """Stream the journals into manifest.csv (one shard's rows in memory at a time)."""
    columns = mf.column_order(("id", "image", "patient_id", "split", "source_id", *source.columns,
                               *source.labels))
    split_counts: Counter = Counter()
    strata: dict[str, list[tuple[str, str]]] = {}
    rows = 0
    tmp = out / (mf.MANIFEST + ".part")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        for row in _journal(state, n_shards):
            if "failed" in row or "dropped" in row:
                continue
            row.pop("dropped_boxes", None)
            row.pop("report_text", None)
            labels = row.pop("labels")
            positive = row.pop("positive", None)
            if positive is None:
                positive = any(v == 1 for c, v in labels.items() if mf.names_a_finding(c)) or bool(row.get("boxes"))
            cells = {**row, **labels}
            writer.writerow([_cell(cells.get(c)) for c in columns])
            split_counts[row["split"]] += 1
            strata.setdefault(row["split"], []).append((row["id"], "positive" if positive else "negative"))
            rows += 1
    tmp.replace(out / mf.MANIFEST)
    return rows, {s: split_counts[s] for s in mf.SPLITS if split_counts[s]}, strata


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list | dict):
        return json.dumps(value, separators=(",", ":")) if value else ""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _finish(out: Path, source: Importer, protocol: protocols.Protocol, options: Options, split_counts: dict,
            strata: dict, dropped: Counter, failed: int) -> dict:
    train = strata.get("train", [])
    fractions = {}
    if train:
        chosen = splits.nested_fractions([i for i, _ in train], [s for _, s in train], options.fractions,
                                         options.seed)
        fractions = splits.write_fractions(out, chosen)
    info = {
        "source": source.name,
        "protocol": protocol.record(),
        "rows": sum(split_counts.values()),
        "splits": split_counts,
        "fractions": fractions,
        "import": {"image_size": options.image_size, "dropped": dict(sorted(dropped.items())), "failed": failed,
                   "uncertain": dict(sorted(options.uncertain.items())), "report": REPORT},
    }
    info["sha256"] = mf.record_hashes(out, workers=options.workers)
    mf.write_info(out, info)
    return info


def summary(result: ImportResult) -> dict:
    """What the CLI prints and MLflow records."""
    return {"source": result.source, "folder": str(result.folder), "protocol": result.protocol.record(),
            "rows": result.rows, "splits": result.splits, "dropped": result.dropped,
            "failed": len(result.failures), "sha256": result.sha256}

