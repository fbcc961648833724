"""The one place that knows the manifest schema (../shared/DESIGN.md, "Manifests").

A dataset is a folder holding `manifest.csv` (one row per image), the files it points at, and
`dataset.json` (counts and hashes). CSV rather than Parquet: the bytes are deterministic and a
human can diff two versions.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from g2d.data import images, text
from g2d.data.splits import FRACTIONS_DIR
from g2d.errors import ImageError, ManifestError

MANIFEST = "manifest.csv"
DATASET_INFO = "dataset.json"
CHECKSUMS = "checksums.sha256"  # every file's sha256, written with dataset.json
SPLITS = ("train", "val", "test")
# Known columns in their canonical order; any other column is a label column (1 / 0 / -1 / empty).
CORE_COLUMNS = ("id", "image", "patient_id", "study_id", "split", "report", "mask", "boxes", "findings",
                "source_id")
TEXT_COLUMNS = set(CORE_COLUMNS)
REQUIRED = ("id", "image")
NOT_FINDINGS = ("normal", "no_finding")  # label columns that say "nothing here" rather than name a finding
LABEL_VALUES = {1, 0, -1}


def label_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c not in TEXT_COLUMNS]


def names_a_finding(column: str) -> bool:
    """False for 'No Finding' / 'normal' columns: no prompt, no stratum, no class to detect."""
    return column.strip().lower().replace(" ", "_") not in NOT_FINDINGS


def column_order(columns) -> list[str]:
    """Core columns in canonical order, then label columns sorted: every manifest's layout."""
    columns = list(dict.fromkeys(columns))
    return [c for c in CORE_COLUMNS if c in columns] + sorted(c for c in columns if c not in TEXT_COLUMNS)


def write_manifest(rows: list[dict[str, Any]] | pd.DataFrame, folder: Path) -> Path:
    """Write `folder/manifest.csv` with columns in canonical order (byte-deterministic)."""
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ManifestError(f"{folder / MANIFEST}: rows lack required columns {missing}")
    df = df.copy()
    for col in ("boxes", "findings"):
        if col in df.columns:
            df[col] = [v if isinstance(v, str) else json.dumps(v, separators=(",", ":")) for v in df[col]]
    ordered = column_order(df.columns)
    for col in label_columns(df):
        df[col] = pd.to_numeric(df[col].replace("", np.nan)).astype("Int8")
    path = folder / MANIFEST
    folder.mkdir(parents=True, exist_ok=True)
    df[ordered].to_csv(path, index=False, lineterminator="\n")
    return path


def manifest_path(path: Path) -> Path:
    """A dataset is addressed by its folder or by the folder's manifest.csv, nothing else: the files
    a manifest names are relative to that folder."""
    path = Path(path)
    if path.is_dir():
        return path / MANIFEST
    if path.name != MANIFEST and path.exists():
        raise ManifestError(f"{path}: a dataset is a folder holding {MANIFEST}; pass the folder or its {MANIFEST}")
    return path


def read_manifest(path: Path, check_labels: bool = True) -> pd.DataFrame:
    """Read a manifest (the file, or the dataset folder holding it). Only the schema is checked
    here; `validate` checks the files it points at (and lists bad labels instead of raising)."""
    path = manifest_path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest here; render one with `g2d data synth` or import a dataset")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError:
        raise ManifestError(_not_utf8(path)) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise ManifestError(f"{path}: not a readable CSV manifest ({e})") from None
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ManifestError(f"{path}: missing required column(s) {missing}; columns are {list(df.columns)}")
    for col in label_columns(df):
        raw = df[col].str.strip()
        values = pd.to_numeric(raw.replace("", np.nan), errors="coerce")
        bad = df.index[raw.ne("") & ~values.isin(list(LABEL_VALUES))]
        if len(bad) and not check_labels:
            values[bad] = np.nan
            df.attrs.setdefault("bad_labels", {})[col] = [int(i) for i in bad]
        elif len(bad):
            raise ManifestError(
                f"{path}: label column '{col}' must hold 1, 0, -1 or empty; rows {_rows(bad)} hold "
                f"{sorted(set(df.loc[bad, col]))[:5]}"
            )
        df[col] = values.astype("Int8")
    return df


def _not_utf8(path: Path) -> str:
    """Where a manifest stops being UTF-8 (the byte offset pandas reports is within its own buffer)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return (f"{path}: not UTF-8 at byte {e.start} (line {line}, byte 0x{data[e.start]:02X}: {e.reason}); "
                "re-save it as UTF-8 (e.g. from Windows-1252: iconv -f cp1252 -t utf-8)")
    return f"{path}: not readable as UTF-8; re-save it as UTF-8"


def _rows(index: Iterable[int], limit: int = 10) -> str:
    """Data rows as the line numbers a user sees in the CSV (header is line 1)."""
    idx = [int(i) + 2 for i in index]
    shown = ", ".join(map(str, idx[:limit]))
    return shown + (f" (+{len(idx) - limit} more)" if len(idx) > limit else "")


def resolve(folder: Path, rel: str, where: str) -> Path:
    """Path of a file named in a manifest, refusing paths that leave the dataset folder."""
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or rel.startswith(("/", "\\")) or ".." in p.parts or ":" in p.parts[0]:
        raise ManifestError(f"{where}: path {rel!r} must be relative to the dataset folder, without '..'")
    return folder / p


# ---------------------------------------------------------------- hashing


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    return sha256_bytes(path.read_bytes())


def referenced_files(df: pd.DataFrame) -> list[str]:
    files = list(df["image"])
    if "mask" in df.columns:
        files += [m for m in df["mask"] if m]
    if "findings" in df.columns:
        for cell in df["findings"]:
            files += [f["mask"] for f in json.loads(cell or "[]") if f.get("mask")]
    return sorted(set(files))


def dataset_hash(folder: Path, progress: Callable[[int], None] | None = None, workers: int = 1,
                 digests: dict[str, str] | None = None) -> str:
    """SHA-256 over the manifest and every file it references (name + content), so any change
    to a row, an image or a mask changes the hash. Files are hashed by `workers` threads (hashlib and
    file reads release the GIL), in a fixed order, so the hash never depends on the worker count.
    `digests`, if given, receives each referenced file's own sha256."""
    df = read_manifest(folder)
    files = referenced_files(df)
    if digests is None:
        digests = {}

    def digest(rel: str) -> str:
        path = resolve(folder, rel, f"{folder / MANIFEST}")
        if not path.is_file():
            raise ManifestError(f"{folder / MANIFEST}: names {rel}, which is missing; run `g2d data validate {folder}`")
        return file_sha256(path)

    with ThreadPoolExecutor(_workers(workers)) as pool:
        for k in range(0, len(files), 256):  # a bounded batch of futures at a time
            batch = files[k:k + 256]
            digests.update(zip(batch, pool.map(digest, batch), strict=True))
            if progress:
                progress(len(batch))
    return combine((folder / MANIFEST).read_bytes(), [(rel, digests[rel]) for rel in files])


def combine(manifest: bytes, digests: list[tuple[str, str]]) -> str:
    """The dataset hash from the manifest's bytes and its files' sha256s, in referenced_files order."""
    h = hashlib.sha256(manifest)
    for rel, file_digest in digests:
        h.update(rel.encode() + b"\0" + file_digest.encode())
    return h.hexdigest()


def record_hashes(folder: Path, progress: Callable[[int], None] | None = None, workers: int = 1) -> str:
    """dataset_hash, writing every file's sha256 to `checksums.sha256` on the way (sha256sum's format: the
    manifest, the fraction files and every referenced file), so a check can later verify any sample of the
    files without reading them all, and `sha256sum -c checksums.sha256` works in the folder."""
    digests: dict[str, str] = {}
    aggregate = dataset_hash(folder, progress, workers, digests)
    own = [MANIFEST, *sorted(p.relative_to(folder).as_posix() for p in (folder / FRACTIONS_DIR).glob("*.txt"))]
    lines = [f"{file_sha256(folder / rel)}  {rel}" for rel in own] + [f"{d}  {rel}" for rel, d in digests.items()]
    tmp = folder / (CHECKSUMS + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, folder / CHECKSUMS)
    return aggregate


def read_checksums(folder: Path) -> dict[str, str] | None:
    """relpath -> sha256 from `checksums.sha256`; None when the dataset has none (written before g2d recorded
    them, or made by hand)."""
    path = folder / CHECKSUMS
    if not path.is_file():
        return None
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64:
            raise ManifestError(f"{path} line {n}: not '<sha256>  <path>'; restore the file (`dvc checkout`) or "
                                "re-render / re-import the dataset")
        out[rel] = digest
    return out


def _workers(n: int) -> int:
    return n or os.cpu_count() or 1


def read_info(folder: Path) -> dict[str, Any]:
    path = folder / DATASET_INFO
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def protocol_tags(record: dict[str, Any] | None) -> dict[str, str]:
    """The split protocol a dataset was imported with, as run tags (name.vN and the file's SHA-256)."""
    if not record:
        return {"g2d.protocol": "none recorded (a rendered dataset: its params.yaml defines the split)"}
    return {"g2d.protocol": f"{record['name']}.v{record['version']}", "g2d.protocol_sha256": record["sha256"]}


def write_info(folder: Path, info: dict[str, Any]) -> Path:
    path = folder / DATASET_INFO
    path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return path


# ---------------------------------------------------------------- validation


@dataclass
class Problem:
    check: str
    message: str
    rows: list[int] = field(default_factory=list)  # CSV line numbers

    def __str__(self) -> str:
        where = f" (rows {_rows([r - 2 for r in self.rows])})" if self.rows else ""
        return f"{self.check}: {len(self.rows) or 1} x {self.message}{where}"


@dataclass
class ValidationReport:
    manifest: Path
    rows: int
    problems: list[Problem]
    notes: list[str] = field(default_factory=list)  # facts worth knowing that are not problems

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.problems:
            out[p.check] = out.get(p.check, 0) + max(len(p.rows), 1)
        return out


def _check_reports(df: pd.DataFrame, add) -> None:
    """Reports are present and ASCII (g2d's text encoders expect English ASCII text: see g2d.data.text).
    Non-ASCII reports are grouped by their first such character, with the first row's id and position."""
    reports = df["report"].fillna("")
    for i in df.index[reports.str.strip() == ""]:
        add("empty report", "report text is empty; fill in its findings / impression or remove the row", i)
    by_char: dict[str, list[int]] = {}
    for i in df.index[~reports.map(str.isascii)]:
        by_char.setdefault(text.first_non_ascii(reports[i])[1], []).append(i)
    for ch, rows in by_char.items():
        first = reports[rows[0]]
        pos = text.first_non_ascii(first)[0]
        if (fixed := text.mojibake(first)) is not None:  # e.g. 'Ã©' for 'é'
            at = (text.first_non_ascii(fixed) or (0, ""))[0]
            cause = (f"it is mojibake (UTF-8 read as Windows-1252: it should read {fixed[max(0, at - 15):at + 15]!r}); "
                     "re-save the source file as UTF-8, then transliterate (unicodedata NFKD, unidecode)")
        else:
            cause = ("transliterate it (unicodedata NFKD, unidecode; `g2d data import` does this), or re-save the "
                     "source file as UTF-8 if it is mojibake")
        message = (f"report text holds non-ASCII {text.describe(ch)}, first in id {df.at[rows[0], 'id']!r} at "
                   f"character {pos + 1}; g2d's text encoders expect English ASCII reports: {cause}")
        for i in rows:
            add("non-ASCII report", message, i)


def validate(folder: Path, progress: Callable[[int], None] | None = None, workers: int = 1,
             sample: int | None = None, seed: int = 0) -> ValidationReport:
    """Check a dataset folder. Every problem lists the offending rows and how many there are. The files
    (decoding every image and mask) are checked in `workers` processes (0 = all cores); rows keep their
    order, so the report never depends on the worker count. With `sample`, the files of that many seeded
    random rows are checked (what a training stage does before its first step) and every row's text."""
    manifest = manifest_path(folder)
    folder = manifest.parent
    df = read_manifest(manifest, check_labels=False)
    files = df
    if sample is not None and sample < len(df):
        files = df.iloc[sorted(random.Random(seed).sample(range(len(df)), sample))]
    found: dict[tuple[str, str], list[int]] = {}
    notes: list[str] = []

    def add(check: str, message: str, i: int) -> None:
        found.setdefault((check, message), []).append(int(i) + 2)

    if df.empty:
        found[("empty manifest", "the manifest has a header but no rows")] = []
    for col, rows in df.attrs.get("bad_labels", {}).items():
        for i in rows:
            add("bad label", f"label column '{col}' must hold 1, 0, -1 or empty", i)
    repeated = df["id"].duplicated(keep="first") | df["image"].duplicated(keep="first")
    for i in df.index[repeated]:
        add("duplicate rows", f"id {df.at[i, 'id']!r} or image {df.at[i, 'image']!r} appears earlier", i)
    if "patient_id" in df.columns:
        for i in df.index[df["patient_id"].str.strip() == ""]:
            add("missing patient id", "patient_id is empty (splits are by patient)", i)
    if "split" in df.columns:
        for i in df.index[~df["split"].isin(SPLITS)]:
            add("bad split", f"split must be one of {', '.join(SPLITS)}", i)
        if "patient_id" in df.columns:
            per_patient = df.groupby("patient_id")["split"].nunique()
            leaking = set(per_patient.index[per_patient > 1])
            protocol = read_info(folder).get("protocol", {})
            if leaking and protocol.get("unit") == "image":  # the paper's by-image splits, recorded as such
                notes.append(f"{len(leaking)} patients have images in more than one split: protocol "
                             f"{protocol.get('name')}.v{protocol.get('version')} splits by image, as the paper does")
                leaking = set()
            for i in df.index[df["patient_id"].isin(leaking)]:
                add("patient in two splits", f"patient {df.at[i, 'patient_id']!r} is in "
                    f"{sorted(set(df.loc[df.patient_id == df.at[i, 'patient_id'], 'split']))}", i)
    if "report" in df.columns:
        _check_reports(df, add)

    for i, entries in _check_files(folder, files, progress, _workers(workers)):
        for check, message in entries:
            add(check, message, i)

    _check_fractions(folder, df, found)
    problems = [Problem(check, msg, rows) for (check, msg), rows in found.items()]
    problems.sort(key=lambda p: (p.check, p.rows[:1]))
    if len(files) < len(df):
        notes.append(f"files checked on {len(files)} sampled rows of {len(df)}")
    return ValidationReport(manifest, len(df), problems, notes)


_FILE_CHUNK = 64  # rows a worker checks per task


def _check_files(folder: Path, df: pd.DataFrame, progress, workers: int):
    """(row index, [(check, message), ...]) for every row, in row order; at most two chunks per worker in
    flight, so memory does not grow with the number of rows."""
    def chunks():
        for k in range(0, len(df), _FILE_CHUNK):
            part = df.iloc[k:k + _FILE_CHUNK]
            yield [(int(i), row) for i, row in zip(part.index, part.to_dict("records"), strict=True)]

    def done(result):
        if progress:
            progress(len(result))
        return result

    if workers == 1 or len(df) <= _FILE_CHUNK:
        for chunk in chunks():
            yield from done(_check_chunk(folder, chunk))
        return
    import multiprocessing as mp
    from collections import deque

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(workers, mp_context=mp.get_context(method)) as pool:
        pending: deque = deque()
        for chunk in chunks():
            pending.append(pool.submit(_check_chunk, folder, chunk))
            if len(pending) >= 2 * workers:
                yield from done(pending.popleft().result())
        while pending:
            yield from done(pending.popleft().result())


def _check_chunk(folder: Path, chunk: list[tuple[int, dict]]) -> list[tuple[int, list[tuple[str, str]]]]:
    out = []
    for i, row in chunk:
        entries: list[tuple[str, str]] = []
        _check_row(folder, row, lambda check, message, _i, e=entries: e.append((check, message)))
        out.append((i, entries))
    return out


def _check_row(folder: Path, row: dict, add) -> None:
    """The files one row names: the image decodes, masks are binary and image-sized, boxes inside."""
    i = -1  # `add` knows its row
    size = _check_image(folder, row, i, add)
    masks = [("mask", row["mask"])] if row.get("mask") else []
    boxes = _parse_json(row, "boxes", i, add)
    for k, f in enumerate(_parse_json(row, "findings", i, add)):
        if not isinstance(f, dict):
            add("bad findings", "findings must be a JSON list of objects", i)
            continue
        if f.get("mask"):
            masks.append((f"findings[{k}].mask", f["mask"]))
        if "box" in f:  # a finding's box is [x0, y0, x1, y1]; its label is the finding's kind
            box = f["box"]
            boxes.append([*box, str(f.get("kind") or "finding")] if isinstance(box, list) else box)
    for what, rel in masks:
        _check_mask(folder, rel, what, size, i, add)
    for box in boxes:
        _check_box(box, size, i, add)


def _check_image(folder: Path, row, i: int, add) -> tuple[int, int] | None:
    try:
        path = resolve(folder, row["image"], "image")
    except ManifestError:
        add("path leaves the dataset", f"image path is absolute or contains '..'; {_INSIDE}", i)
        return None
    if not path.is_file():
        add("missing file", "image file does not exist", i)
        return None
    arr = _decode(path, "image", i, add)
    if arr is None:
        return None
    if arr.size == 0:
        add("undecodable image", "image has no pixels; re-export it", i)
        return None
    return arr.shape[1], arr.shape[0]  # (width, height)


_INSIDE = "copy the file into the dataset folder and name it relative to manifest.csv"


def _decode(path: Path, what: str, i: int, add) -> np.ndarray | None:
    """The file's pixels as the datasets will read them (images.read_stored), or None after listing why not."""
    try:
        return images.read_stored(path)
    except ImageError as e:  # grouped by cause: the message holds neither the file nor per-file numbers
        add(e.check, f"{what} {e.problem}; {e.fix}", i)
    except Exception as e:  # a decoder failing in a way images.py does not know: still listed, never skipped
        add("undecodable image", f"{what} cannot be decoded ({type(e).__name__}); re-copy or re-export it", i)
    return None


def _check_mask(folder: Path, rel: str, what: str, size, i: int, add) -> None:
    try:
        path = resolve(folder, rel, what)
    except ManifestError:
        add("path leaves the dataset", f"{what} path is absolute or contains '..'; {_INSIDE}", i)
        return
    if not path.is_file():
        add("missing file", f"{what} file does not exist", i)
        return
    arr = _decode(path, what, i, add)
    if arr is None:
        return
    if arr.ndim != 2:
        add("mask not binary", f"{what} must be a single-channel image; save it as a 1-bit or 8-bit grey PNG", i)
    else:
        values = set(np.unique(arr).tolist())
        if not (values <= {0, 1} or values <= {0, 255}):
            add("mask not binary", f"{what} holds values other than 0 and 1 / 255; threshold it and save it as "
                "PNG (JPG's compression adds grey levels)", i)
    if size is not None and (arr.shape[1], arr.shape[0]) != size:
        add("mask size", f"{what} is not the size of its image; resize it to the image's size (nearest-neighbour) "
            "or check that the row names the right mask", i)


def _parse_json(row, col: str, i: int, add) -> list:
    cell = row.get(col)
    if cell is None or (isinstance(cell, float) and math.isnan(cell)) or cell == "":
        return []
    try:
        value = json.loads(cell)
    except json.JSONDecodeError:
        add(f"bad {col}", f"{col} is not valid JSON", i)
        return []
    if not isinstance(value, list):
        add(f"bad {col}", f"{col} must be a JSON list", i)
        return []
    return list(value)


def _check_box(box, size, i: int, add) -> None:
    if not (isinstance(box, list) and len(box) == 5 and isinstance(box[4], str) and box[4]
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in box[:4])):
        add("bad boxes", "a box must be [x0, y0, x1, y1, label] with numbers and a label", i)
        return
    x0, y0, x1, y1 = box[:4]
    if not (x0 < x1 and y0 < y1):
        add("bad boxes", "a box needs x0 < x1 and y0 < y1", i)
    elif size is not None and (x0 < 0 or y0 < 0 or x1 > size[0] or y1 > size[1]):
        add("box outside the image", "a box lies outside the image", i)


def _check_fractions(folder: Path, df: pd.DataFrame, found: dict) -> None:
    """The label-fraction files recorded in dataset.json: present, unchanged (sha256), and naming
    only rows of the train split, so a run that trains on a fraction sees what was hashed."""
    train = set(df.loc[df["split"] == "train", "id"]) if "split" in df.columns else set(df["id"])
    for frac, entry in read_info(folder).get("fractions", {}).items():
        where = f"fraction {frac} ({entry.get('file')})"
        try:
            path = resolve(folder, entry["file"], where)
        except (KeyError, ManifestError):
            found[("bad fraction", f"{where}: no valid file in dataset.json")] = []
            continue
        if not path.is_file():
            found[("bad fraction", f"{where}: file is missing")] = []
            continue
        data = path.read_bytes()
        if sha256_bytes(data) != entry.get("sha256"):
            found[("bad fraction", f"{where}: sha256 differs from dataset.json")] = []
        outside = [i for i in data.decode().split() if i not in train]
        if outside:
            found[("bad fraction", f"{where}: {len(outside)} ids not in the train split, e.g. {outside[0]!r}")] = []
