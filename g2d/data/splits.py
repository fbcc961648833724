"""Patient-level splits and nested, seeded label fractions.

Splits are by patient so no patient is in two splits. A label fraction f takes, within each
stratum of the train split, the first ceil(f * n) rows of one seeded permutation; so the 1%
subset is inside the 10% subset, which is inside 100%, and each stratum (e.g. positives) is
represented even at 1%. The chosen ids are written one per line and hashed, so every run can
record exactly which images it saw.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

FRACTIONS_DIR = "fractions"


def _stable_order(values: Sequence[str]) -> list[str]:
    return sorted(set(values))


def assign_splits(
    patients: Sequence[str], strata: Sequence[str], val: float, test: float, seed: int
) -> dict[str, str]:
    """patient id -> train / val / test. `strata` (one per patient id, same order) keeps each
    split's share of positives close to the whole; a patient's stratum is its first one."""
    stratum_of: dict[str, str] = {}
    for p, s in zip(patients, strata, strict=True):
        stratum_of.setdefault(p, s)
    rng = np.random.default_rng(seed)
    out: dict[str, str] = {}
    for stratum in _stable_order(list(stratum_of.values())):
        group = [p for p in _stable_order(list(stratum_of)) if stratum_of[p] == stratum]
        order = [group[i] for i in rng.permutation(len(group))]
        n_test = round(len(order) * test)
        n_val = round(len(order) * val)
        for i, p in enumerate(order):
            out[p] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def nested_fractions(
    ids: Sequence[str], strata: Sequence[str], fractions: Sequence[float], seed: int
) -> dict[float, list[str]]:
    """fraction -> sorted ids; smaller fractions are subsets of larger ones."""
    rng = np.random.default_rng(seed)
    by_stratum: dict[str, list[str]] = {}
    for i, s in zip(ids, strata, strict=True):
        by_stratum.setdefault(s, []).append(i)
    ranked = {}
    for s in _stable_order(list(by_stratum)):
        group = sorted(by_stratum[s])
        ranked[s] = [group[k] for k in rng.permutation(len(group))]
    return {
        f: sorted(i for group in ranked.values() for i in group[: math.ceil(f * len(group))])
        for f in fractions
    }


def fraction_name(f: float) -> str:
    return f"train_{f:g}.txt"


def write_fractions(folder: Path, chosen: dict[float, list[str]]) -> dict[str, dict]:
    """Write fractions/train_<f>.txt; return {str(f): {file, rows, sha256}} for dataset.json."""
    out_dir = folder / FRACTIONS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {}
    for f, ids in chosen.items():
        data = ("\n".join(ids) + "\n").encode()
        path = out_dir / fraction_name(f)
        path.write_bytes(data)
        info[f"{f:g}"] = {"file": f"{FRACTIONS_DIR}/{path.name}", "rows": len(ids),
                          "sha256": hashlib.sha256(data).hexdigest()}
    return info


def add_splits(df: pd.DataFrame, strata_col: str | None, val: float, test: float, seed: int) -> pd.DataFrame:
    strata = df[strata_col].astype(str) if strata_col else pd.Series("all", index=df.index)
    mapping = assign_splits(list(df["patient_id"]), list(strata), val, test, seed)
    df = df.copy()
    df["split"] = df["patient_id"].map(mapping)
    return df
