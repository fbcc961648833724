"""Is the dataset on disk still the one the project recorded? Checked before a run spends hours on it.

Two records can vouch for a dataset folder:
- DVC's: the `dvc.lock` output (or `.dvc` file) that covers the folder, whose `.dir` object in the DVC
  cache lists every file's md5. Files are compared by name, and by content (all of them when the folder
  is small, else the manifest, dataset.json, the fraction files and a seeded sample).
- the dataset's own: the sha256 that `dataset.json` records over the manifest and every file it names
  (`manifest.dataset_hash`), and each file's sha256 in `checksums.sha256` (which must add up to it):
  all files are hashed when the folder is small, else the manifest, the fraction files and a sample.

A mismatch is a `DataError` that names the files and says how to bring the data back (`dvc checkout`,
`dvc repro`).
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from g2d.data import manifest as mf
from g2d.data.splits import FRACTIONS_DIR
from g2d.errors import DataError

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: a large dvc.lock parses ~8x faster


@dataclass(frozen=True)
class DvcRecord:
    """What DVC recorded for the tracked folder that holds a dataset."""

    path: str  # the tracked folder, relative to the project root (as dvc.lock writes it)
    md5: str  # "<hex>.dir"
    source: str  # "dvc.lock (stage synth)" or "data.dvc"
    fix: str  # the commands that bring the recorded files back


@dataclass(frozen=True)
class Verified:
    how: str  # one line for the preflight report


def dvc_record(root: Path, folder: Path) -> DvcRecord | None:
    """The `dvc.lock` output or `.dvc` file covering `folder` (the innermost one), if any."""
    try:
        rel = folder.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return None
    found: list[DvcRecord] = []
    lock = root / "dvc.lock"
    if lock.is_file():
        stages = (_yaml(lock).get("stages") or {})
        for stage, entry in stages.items():
            for out in entry.get("outs") or []:
                if str(out.get("md5", "")).endswith(".dir"):
                    found.append(DvcRecord(out["path"], out["md5"], f"dvc.lock (stage {stage})",
                                           f"`dvc checkout {out['path']}` (or `dvc repro {stage}`)"))
    for dvc_file in sorted(p for p in root.glob("*.dvc") if p.is_file()):
        for out in _yaml(dvc_file).get("outs") or []:
            if str(out.get("md5", "")).endswith(".dir"):
                found.append(DvcRecord(out["path"], out["md5"], dvc_file.name,
                                       f"`dvc checkout {dvc_file.name}` (or `dvc add {out['path']}` if you "
                                       "changed it on purpose)"))
    covering = [r for r in found if rel == r.path.rstrip("/") or rel.startswith(r.path.rstrip("/") + "/")]
    return max(covering, key=lambda r: len(r.path)) if covering else None


def _yaml(path: Path) -> dict:
    try:
        return yaml.load(path.read_text(), Loader=_LOADER) or {}
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"{path}: unreadable ({e}); restore it from git (`git checkout {path.name}`)") from None


def cache_dir(root: Path) -> Path:
    """The DVC cache: `cache.dir` of .dvc/config.local or .dvc/config (relative to .dvc/), else .dvc/cache."""
    for name in ("config.local", "config"):
        path = root / ".dvc" / name
        if path.is_file():
            parser = configparser.ConfigParser()
            try:
                parser.read(path)
            except configparser.Error:
                continue
            if parser.has_option("cache", "dir"):
                return (root / ".dvc" / parser.get("cache", "dir").strip("'\"")).resolve()
    return root / ".dvc" / "cache"


def dvc_listing(root: Path, record: DvcRecord) -> dict[str, str] | None:
    """relpath -> md5 of every file DVC recorded in the folder; None when the cache lacks the listing."""
    digest = record.md5.removesuffix(".dir")
    path = cache_dir(root) / "files" / "md5" / digest[:2] / f"{digest[2:]}.dir"
    if not path.is_file():
        return None
    try:
        return {e["relpath"]: e["md5"] for e in json.loads(path.read_text())}
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a damaged cache entry: the dataset's own hash still applies


def _files(folder: Path) -> dict[str, int]:
    """relpath -> size of every file under the folder."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = Path(dirpath) / name
            out[path.relative_to(folder).as_posix()] = path.stat().st_size
    return out


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _examples(names: list[str], n: int = 3) -> str:
    return ", ".join(sorted(names)[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def verify(folder: Path, root: Path, *, hash_all_below: int, sample: int, seed: int = 0) -> Verified:
    """Compare the dataset folder with DVC's record, else with its dataset.json sha256; raise DataError on any
    difference. Folders of at most `hash_all_below` bytes are hashed in full, larger ones by a sample."""
    folder = mf.manifest_path(folder).parent
    on_disk = _files(folder)
    total = sum(on_disk.values())
    record = dvc_record(root, folder)
    listing = dvc_listing(root, record) if record else None
    unrecorded = ""
    if record is not None and listing is not None:
        if _under(folder, root, record, listing):
            return _against_dvc(folder, root, record, listing, on_disk, total <= hash_all_below, sample, seed)
        # a dataset imported into a tracked folder since it was last recorded (`dvc add` not run yet)
        unrecorded = f"new in {record.path}, not yet recorded by {record.source} (`dvc add {record.path}`); "
    info = mf.read_info(folder)
    recorded = info.get("sha256")
    if not recorded:  # a hand-made manifest: nothing to compare with (the run records the hash it sees)
        return Verified(unrecorded + f"no recorded hash to compare with (not tracked by DVC here, no sha256 in "
                        f"{mf.DATASET_INFO}); `g2d data validate` checks every file")
    sums = mf.read_checksums(folder)
    if sums is not None:
        verified = _against_checksums(folder, recorded, sums, total <= hash_all_below, sample, seed)
        return Verified(unrecorded + verified.how)
    if total > hash_all_below:
        return Verified(unrecorded + f"{len(on_disk)} files, {total / 1e9:.1f} GB: over the full-hash limit, not "
                        f"tracked by DVC here and without {mf.CHECKSUMS}, so only the sampled validation checks them "
                        "(`g2d data validate` checks every file)")
    actual = mf.dataset_hash(folder)
    if actual != recorded:
        raise DataError(f"{folder}: the files no longer match the sha256 {recorded[:12]} that {mf.DATASET_INFO} "
                        f"records (now {actual[:12]}); {_FIX_LOCAL}")
    return Verified(unrecorded + f"matches {mf.DATASET_INFO} sha256 {recorded[:12]} ({len(on_disk)} files hashed)")


_FIX_LOCAL = ("bring them back with `dvc checkout` if DVC tracks them, or re-render (`g2d data synth`) / re-import "
              "the dataset")


def _sample(present: list[str], hash_all: bool, sample: int, seed: int) -> list[str]:
    """What to hash: everything, or what a run reads first (manifest, dataset.json, fractions) and a seeded
    sample of the rest."""
    if hash_all:
        return present
    always = [r for r in present if r in (mf.MANIFEST, mf.DATASET_INFO) or r.startswith(FRACTIONS_DIR + "/")]
    rest = [r for r in present if r not in set(always)]
    return always + random.Random(seed).sample(rest, min(sample, len(rest)))


def _differences(changed: list[str], missing: list[str], extra: list[str] = ()) -> str:
    return "; ".join(f"{len(v)} {what}, e.g. {_examples(v)}" for what, v in (
        ("changed", changed), ("missing", missing), ("not recorded", list(extra))) if v)


def _against_checksums(folder: Path, recorded: str, sums: dict[str, str], hash_all: bool, sample: int,
                       seed: int) -> Verified:
    """The per-file sha256s of checksums.sha256 must add up to dataset.json's sha256 (so neither can be edited
    alone), and the files on disk must match them."""
    manifest = (folder / mf.MANIFEST).read_bytes()
    files = mf.referenced_files(mf.read_manifest(folder))
    if mf.sha256_bytes(manifest) != sums.get(mf.MANIFEST):
        raise DataError(f"{folder}: {mf.MANIFEST} changed since {mf.CHECKSUMS} was written (sha256 differs); "
                        f"{_FIX_LOCAL}")
    unlisted = [f for f in files if f not in sums]
    if unlisted or mf.combine(manifest, [(f, sums[f]) for f in files]) != recorded:
        raise DataError(f"{folder}: {mf.CHECKSUMS} does not add up to the sha256 {recorded[:12]} in "
                        f"{mf.DATASET_INFO}" + (f" ({len(unlisted)} files unlisted, e.g. {_examples(unlisted)})"
                                                if unlisted else "") + f"; {_FIX_LOCAL}")
    missing = sorted(rel for rel in sums if not (folder / rel).is_file())
    chosen = _sample(sorted(set(sums) - set(missing)), hash_all, sample, seed)
    changed = [rel for rel in chosen if mf.file_sha256(folder / rel) != sums[rel]]
    if changed or missing:
        raise DataError(f"{folder}: differs from its {mf.CHECKSUMS} ({_differences(changed, missing)}); {_FIX_LOCAL}")
    return Verified(f"matches {mf.DATASET_INFO} sha256 {recorded[:12]} through {mf.CHECKSUMS} ({len(chosen)} of "
                    f"{len(sums)} files hashed)")


def _prefix(folder: Path, root: Path, record: DvcRecord) -> str:
    """The dataset folder's path inside the tracked folder, as DVC's listing spells it ('' or 'sub/dir/')."""
    rel = folder.resolve().relative_to((root / record.path).resolve()).as_posix()
    return "" if rel == "." else rel + "/"


def _under(folder: Path, root: Path, record: DvcRecord, listing: dict[str, str]) -> bool:
    prefix = _prefix(folder, root, record)
    return any(rel.startswith(prefix) for rel in listing)


def _against_dvc(folder: Path, root: Path, record: DvcRecord, listing: dict[str, str], on_disk: dict[str, int],
                 hash_all: bool, sample: int, seed: int) -> Verified:
    prefix = _prefix(folder, root, record)
    expected = {rel[len(prefix):]: md5 for rel, md5 in listing.items() if rel.startswith(prefix)}
    missing = sorted(set(expected) - set(on_disk))
    extra = sorted(set(on_disk) - set(expected))
    chosen = _sample(sorted(set(expected) & set(on_disk)), hash_all, sample, seed)
    changed = [rel for rel in chosen if _md5(folder / rel) != expected[rel]]
    if missing or extra or changed:
        raise DataError(f"{folder}: differs from what {record.source} records for {record.path} "
                        f"({_differences(changed, missing, extra)}); bring it back with {record.fix}")
    return Verified(f"matches {record.source} for {record.path} ({len(chosen)} of {len(expected)} files hashed)")
