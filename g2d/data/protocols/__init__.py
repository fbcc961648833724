"""Named, versioned split protocols: which image goes to train / val / test for an imported dataset.

Published numbers on the same dataset differ by points because papers split it differently. A protocol
makes the split explicit: a YAML file in this folder (`<name>.v<version>.yaml`) whose SHA-256 is listed
in `SHA256SUMS`, so an edit without a new version is refused and every run can record the protocol's
name and hash. A protocol draws, per split, a count (`n`) or a share of a source's official partition
(its "pool": CheXpert's train / valid, COVIDx's train / test lists, ...), by image or by patient, from
one seeded permutation; the split without a count takes the rest of its pool.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from g2d.errors import ConfigError, DataError

FOLDER = Path(__file__).parent
CHECKSUMS = FOLDER / "SHA256SUMS"
SPLITS = ("train", "val", "test")
_FILE = re.compile(r"(?P<name>[a-z0-9-]+)\.v(?P<version>\d+)\.yaml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Draw(_Strict):
    """How one split is drawn from a pool: `n` units, a `share` of the pool's units, or (neither) the rest."""

    pool: str
    n: int | None = Field(None, ge=1)
    share: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _one_rule(self) -> Draw:
        if self.n is not None and self.share is not None:
            raise ValueError("give n or share, not both")
        return self


class Subset(_Strict):
    """Keep only images with exactly one of `one_of` positive (the others negative or blank), `per_class`
    of each, drawn with the protocol's seed: the CheXpert 5x200 zero-shot set of GLoRIA."""

    one_of: tuple[str, ...] = Field(min_length=2)
    per_class: int = Field(ge=1)
    others: tuple[str, ...] = Field((), description="columns that must also be negative or blank (GLoRIA: the "
                                                    "other findings)")


class Protocol(_Strict):
    name: str
    version: int = Field(ge=1)
    source: str
    description: str
    unit: Literal["image", "patient"] = Field(description="what the draw permutes; 'patient' keeps a patient's "
                                                          "images in one split")
    seed: int = 0
    splits: dict[Literal["train", "val", "test"], Draw]
    subset: Subset | None = None
    paper: dict[Literal["train", "val", "test"], int] = Field({}, description="the sizes the paper reports")
    sha256: str = ""  # of the file, filled in by `load`

    @model_validator(mode="after")
    def _consistent(self) -> Protocol:
        if self.unit == "patient" and any(d.n is not None for d in self.splits.values()):
            raise ValueError("a patient-level protocol draws shares of patients, not counts of images (n)")
        rests: dict[str, list[str]] = {}
        for split, d in self.splits.items():
            if d.n is None and d.share is None:
                rests.setdefault(d.pool, []).append(split)
        if any(len(v) > 1 for v in rests.values()):
            raise ValueError(f"at most one split per pool may take the rest, got {rests}")
        return self

    @property
    def label(self) -> str:
        return f"{self.name}.v{self.version}"

    def record(self) -> dict:
        """What dataset.json and every run record about the protocol."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256, "unit": self.unit,
                "paper_sizes": dict(self.paper)}


def _checksums() -> dict[str, str]:
    out = {}
    for line in CHECKSUMS.read_text().splitlines():
        if line.strip():
            digest, name = line.split()
            out[name] = digest
    return out


def available() -> dict[str, list[int]]:
    """Protocol name -> its versions, from the files in this folder."""
    out: dict[str, list[int]] = {}
    for path in sorted(FOLDER.glob("*.yaml")):
        m = _FILE.fullmatch(path.name)
        if m:
            out.setdefault(m["name"], []).append(int(m["version"]))
    return {k: sorted(v) for k, v in sorted(out.items())}


def load(spec: str) -> Protocol:
    """`name` (its newest version) or `name.vN`; the file's SHA-256 must match SHA256SUMS."""
    known = available()
    m = re.fullmatch(r"(?P<name>[a-z0-9-]+?)(\.v(?P<version>\d+))?", spec)
    if not m or m["name"] not in known:
        import difflib

        close = difflib.get_close_matches(spec, list(known), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"unknown protocol {spec!r}: {hint}protocols are {', '.join(known)} (g2d/data/protocols)")
    version = int(m["version"]) if m["version"] else known[m["name"]][-1]
    path = FOLDER / f"{m['name']}.v{version}.yaml"
    if not path.is_file():
        raise ConfigError(f"protocol {m['name']} has no version {version}; versions are {known[m['name']]}")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    expected = _checksums().get(path.name)
    if digest != expected:
        raise ConfigError(f"{path}: SHA-256 {digest[:12]}... is not the one SHA256SUMS lists "
                          f"({(expected or 'none')[:12]}...); a protocol never changes in place: write "
                          f"{m['name']}.v{version + 1}.yaml and add its hash to SHA256SUMS")
    try:
        protocol = Protocol(**yaml.safe_load(data), sha256=digest)
    except (ValidationError, TypeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not a valid protocol ({e})") from None
    if (protocol.name, protocol.version) != (m["name"], version):
        raise ConfigError(f"{path}: names {protocol.label} inside; the file name and its content must agree")
    return protocol


def for_source(source: str) -> list[str]:
    """Names of the protocols written for a source."""
    return [name for name in available() if load(name).source == source]


def assign(protocol: Protocol, ids: Sequence[str], patients: Sequence[str], pools: Sequence[str],
           where: str) -> dict[str, str]:
    """id -> split for every image the protocol places; images of a pool no split draws from are absent
    (the caller counts them). `where` names the import in errors."""
    pools_used = {d.pool for d in protocol.splits.values()}
    unknown = sorted(pools_used - set(pools))
    if unknown and len(ids):
        raise DataError(f"{where}: protocol {protocol.label} draws from pool(s) {unknown}, but the source has "
                        f"{sorted(set(pools))}; is --src the right dataset?")
    units_of: dict[str, list[str]] = {}  # pool -> units in a stable order
    members: dict[tuple[str, str], list[str]] = {}  # (pool, unit) -> image ids
    unit_pool: dict[str, str] = {}
    for i, p, pool in zip(ids, patients, pools, strict=True):
        if pool not in pools_used:
            continue
        unit = p if protocol.unit == "patient" else i
        if unit_pool.setdefault(unit, pool) != pool:
            raise DataError(f"{where}: patient {p!r} is in two official partitions ({unit_pool[unit]!r} and "
                            f"{pool!r}); protocol {protocol.label} splits by patient, so it cannot keep them apart")
        if (pool, unit) not in members:
            units_of.setdefault(pool, []).append(unit)
        members.setdefault((pool, unit), []).append(i)

    rng = np.random.default_rng(protocol.seed)
    out: dict[str, str] = {}
    for pool in sorted(units_of):
        units = sorted(units_of[pool])
        order = [units[k] for k in rng.permutation(len(units))]
        taken = 0
        # counted draws first, in train / val / test order of their names, then the rest
        draws = [(s, d) for s, d in sorted(protocol.splits.items(), key=lambda x: SPLITS.index(x[0]))
                 if d.pool == pool]
        for split, d in sorted(draws, key=lambda x: (x[1].n is None and x[1].share is None, SPLITS.index(x[0]))):
            if d.n is None and d.share is None:
                count = len(order) - taken
            else:
                count = d.n if d.n is not None else round(d.share * len(order))
                if taken + count > len(order):
                    raise DataError(
                        f"{where}: protocol {protocol.label} takes {count} {protocol.unit}s for {split} from pool "
                        f"{pool!r}, which has {len(order) - taken} left of {len(order)}; its sizes are those of the "
                        f"full dataset ({dict(protocol.paper) or 'see the file'}): for a subset use a protocol "
                        f"that draws shares, e.g. {protocol.source}-patient")
            for unit in order[taken:taken + count]:
                for i in members[(pool, unit)]:
                    out[i] = split
            taken += count
    return out


def select_subset(subset: Subset, ids: Sequence[str], labels: Mapping[str, Sequence[float | None]],
                  seed: int, where: str) -> list[str]:
    """Ids of the one-positive subset, `per_class` per class."""
    missing = [c for c in (*subset.one_of, *subset.others) if c not in labels]
    if missing:
        raise DataError(f"{where}: the subset needs label column(s) {missing}")

    def matrix(columns: tuple[str, ...]) -> np.ndarray:
        return np.array([[np.nan if v is None else float(v) for v in labels[c]] for c in columns]).T.reshape(
            len(ids), len(columns))

    values, others = matrix(subset.one_of), matrix(subset.others)
    positive = values == 1
    rest_negative = np.all(positive | (values == 0) | np.isnan(values), axis=1) & \
        np.all((others == 0) | np.isnan(others), axis=1)
    exactly_one = (positive.sum(axis=1) == 1) & rest_negative
    rng = np.random.default_rng(seed)
    chosen: list[str] = []
    for k, name in enumerate(subset.one_of):
        pool = sorted(ids[i] for i in np.flatnonzero(exactly_one & positive[:, k]))
        if len(pool) < subset.per_class:
            raise DataError(f"{where}: the subset takes {subset.per_class} images with only {name} positive, but the "
                            f"source has {len(pool)}")
        chosen += [pool[i] for i in sorted(rng.choice(len(pool), subset.per_class, replace=False))]
    return sorted(chosen)
