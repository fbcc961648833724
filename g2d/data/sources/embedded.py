"""The four real annotation files that ship inside torchxrayvision and seed SynthCXR.

`fetch` copies them byte for byte into `data/` (tracked by data.dvc), checking SHA-256, so a
fresh clone regenerates exactly the data that data.dvc records.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

from g2d.errors import DataError

TORCHXRAYVISION_VERSION = "1.5.7"


@dataclass(frozen=True)
class SourceFile:
    name: str
    sha256: str
    what: str


REPORTS = SourceFile(
    "NLMCXR_reports.tgz",
    "8fb6de7eec73d8c3665067ad4bb003ccd57f971ae316d2642e1627ac7268667a",
    "3,955 Indiana University chest X-ray reports (XML, findings / impression, MeSH terms)",
)
LUNG_MASKS = SourceFile(
    "semantic_masks_v7labs_lungs.zip",
    "4ec292d919c2524032855fb071d3c0842b1ab5344357aaadc036b42d3ea0ded8",
    "517 real lung-field masks (V7 Labs)",
)
SIIM_RLE = SourceFile(
    "siim-pneumothorax-train-rle.csv.gz",
    "f3663a1ae9d11067b7a37a3c4fb69e22eb3c7a960d4118c47235e0e1cab64489",
    "SIIM-ACR pneumothorax masks, run-length encoded on 1024 x 1024",
)
RSNA_LABELS = SourceFile(
    "kaggle_stage_2_train_labels.csv.zip",
    "73044dc075ffa05bde37b6c6165661a87d7c3fd0fdd277f909945e11263c06b0",
    "RSNA pneumonia detection labels (boxes on 1024 x 1024)",
)
SOURCES = (REPORTS, LUNG_MASKS, SIIM_RLE, RSNA_LABELS)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def package_data_dir() -> Path:
    """The data folder of the installed torchxrayvision, found without importing it (and torch)."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("torchxrayvision is not installed; install g2d's dependencies: pip install -e .")
    installed = importlib.metadata.version("torchxrayvision")
    if installed != TORCHXRAYVISION_VERSION:
        raise DataError(
            f"torchxrayvision {installed} is installed, but the embedded sources are pinned to "
            f"{TORCHXRAYVISION_VERSION}: pip install torchxrayvision=={TORCHXRAYVISION_VERSION}"
        )
    return Path(spec.submodule_search_locations[0]) / "data"


def verify(path: Path, source: SourceFile) -> None:
    if not path.is_file():
        raise DataError(f"{path}: missing source file ({source.what}); run `g2d data fetch`")
    digest = sha256_file(path)
    if digest != source.sha256:
        raise DataError(
            f"{path}: SHA-256 {digest[:12]}... differs from the expected {source.sha256[:12]}...; "
            "delete it and run `g2d data fetch`"
        )


def fetch(dest: Path) -> list[tuple[SourceFile, Path, bool]]:
    """Copy each source into `dest`; returns (source, path, copied) — copied is False when an
    identical file was already there."""
    src_dir = package_data_dir()
    dest.mkdir(parents=True, exist_ok=True)
    done = []
    for source in SOURCES:
        src = src_dir / source.name
        verify(src, source)
        target = dest / source.name
        if target.is_file() and sha256_file(target) == source.sha256:
            done.append((source, target, False))
            continue
        tmp = target.with_name(target.name + ".part")
        shutil.copyfile(src, tmp)
        verify(tmp, source)
        tmp.replace(target)
        done.append((source, target, True))
    return done


def source_path(sources_dir: Path, source: SourceFile) -> Path:
    """Path of a fetched, verified source file."""
    path = sources_dir / source.name
    verify(path, source)
    return path
