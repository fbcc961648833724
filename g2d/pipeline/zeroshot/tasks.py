"""The zero-shot and grounding tasks (paper Table 2a / 2b), and which dataset each reads.

SynthCXR is the default where it has an equivalent: its pre-training set's finding columns (and each
rendered finding's mask), the pneumothorax set for SIIM and the opacity set for RSNA. The others need an
imported dataset: `zeroshot.datasets.<task>` points a task at any manifest folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from g2d.config import Params
from g2d.data import manifest as mf
from g2d.data import tasks
from g2d.errors import ConfigError, DataError


@dataclass(frozen=True)
class Source:
    name: str
    synthcxr: str | None  # the SynthCXR set read by default; None = needs an imported dataset
    paper: str
    multiclass: bool = False  # one finding per image: the class whose prompt is closest wins
    classes: tuple[str, ...] = ()  # the label columns prompted for; () = every column naming a finding


ZEROSHOT = {s.name: s for s in (
    Source("synthcxr", "pretrain", "SynthCXR finding columns (multi-label), macro AUC"),
    Source("siim", "pneumothorax", "SIIM-ACR pneumothorax vs none, AUC"),
    Source("rsna", "opacity", "RSNA pneumonia (lung opacity) vs normal, AUC"),
    Source("chexpert-5x200", None, "CheXpert 5x200, one of 5 findings, accuracy", multiclass=True,
           classes=tasks.CHEXPERT_5),
    Source("chestxray14", None, "ChestX-ray14, 14 findings (multi-label), macro AUC"),
)}
GROUNDING = {s.name: s for s in (
    Source("synthcxr", "pretrain", "each rendered SynthCXR finding's phrase vs its own mask"),
    Source("siim", "pneumothorax", "pneumothorax vs its SIIM mask"),
    Source("rsna", "opacity", "lung opacity vs its RSNA box"),
    Source("ms-cxr", None, "MS-CXR phrases vs their boxes"),
)}


def get(name: str, table: dict[str, Source], command: str) -> Source:
    if name not in table:
        raise ConfigError(f"unknown {command} task {name!r}: tasks are {', '.join(table)}")
    return table[name]


def dataset_folder(source: Source, params: Params, root: Path) -> Path:
    return tasks.configured_folder(params.zeroshot.datasets.get(source.name), source.synthcxr,
                                   f"zeroshot.datasets.{source.name}", f"task {source.name!r} ({source.paper})",
                                   params, root)


def classes(df: pd.DataFrame, folder: Path, wanted: tuple[str, ...] = ()) -> tuple[tuple[str, ...], list[str]]:
    """The label columns prompted for (`wanted`, else every column that names a finding) and those left out
    ('No Finding', 'normal', or the columns a task does not ask about)."""
    columns = mf.label_columns(df)
    if wanted:
        absent = [c for c in wanted if c not in columns]
        if absent:
            raise DataError(f"{folder / mf.MANIFEST}: the task needs label column(s) {absent}; columns are "
                            f"{list(df.columns)}")
        return tuple(wanted), [c for c in columns if c not in wanted]
    excluded = [c for c in columns if not mf.names_a_finding(c)]  # "no normal" is not a prompt
    found = tuple(c for c in columns if c not in excluded)
    if not found:
        raise DataError(f"{folder / mf.MANIFEST}: no label columns to prompt for (columns: {list(df.columns)})")
    return found, excluded
