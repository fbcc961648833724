"""Does dense pre-training ground phrases better than global alignment alone? G2D against global-only on
the pointing game, paired by phrase (every encoder is scored on the same test targets) and, where each was
pre-trained with several seeds, by seed: the two-way bootstrap and sign-flip test of study/stats.py.

With one pre-training seed per encoder (the main job) the interval is over phrases only: it says how sure
the difference is for these two trained models on these phrases, not for another pre-training run; the
study's `grounding_seeds` add runs, and with them an interval and a test over seeds too.

Reads the `per_target` records of `g2d ground` (metrics/grounding, metrics/ablations/grounding)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from g2d.errors import DataError
from g2d.pipeline import metrics_files
from g2d.pipeline.study import stats as study_stats

SCORES = ("pointing", "pointing_body")  # the per-target hits `g2d ground` keeps


@dataclass(frozen=True)
class Grounded:
    """One encoder's grounding of one task: its hits per target, in the order of `ids`."""

    path: Path
    task: str
    model: str
    variant: str | None
    seed: int | None
    ids: tuple[str, ...]
    hits: dict[str, np.ndarray]  # score -> (targets,) 0/1
    test: dict  # the file's test scores (means, chance)


def read(folder: Path) -> tuple[list[Grounded], list[Path]]:
    """The grounding metrics files of `folder` with per-target hits, and those without (older g2d versions)."""
    found, without = [], []
    for path in metrics_files.files(folder):
        run = metrics_files.parse(path, "grounding", lambda m, path=path: _grounded(m, path), "its stage (g2d ground)")
        if run is None:
            without.append(path)
        else:
            found.append(run)
    return found, without


def _grounded(m: dict, path: Path) -> Grounded | None:
    per = m.get("per_target")
    if per is None:
        return None
    ids = tuple(per["id"])
    hits = {k: np.asarray(per[k], dtype=np.float64) for k in SCORES}
    if any(len(v) != len(ids) for v in hits.values()):
        raise ValueError(f"per_target has {len(ids)} ids but {[len(v) for v in hits.values()]} hits")
    return Grounded(path, m["task"], m["model"], m.get("variant"), m.get("model_seed"), ids, hits, dict(m["test"]))


def by_seed(runs: list[Grounded], what: str) -> dict[int, Grounded]:
    """One run per pre-training seed (a run without a recorded seed counts as seed -1, alone)."""
    out: dict[int, Grounded] = {}
    for r in runs:
        seed = -1 if r.seed is None else r.seed
        if seed in out:
            raise DataError(f"{r.path} and {out[seed].path}: two {what} runs with pre-training seed {seed}; "
                            "delete one")
        out[seed] = r
    return out


def compare(a: list[Grounded], b: list[Grounded], names: tuple[str, str], score: str = "pointing", *,
            confidence: float = 0.95, alpha: float = 0.05, n_resamples: int = 9999
            ) -> study_stats.Comparison | None:
    """`score` of a minus b (x 100), paired by seed and by target; None without a seed both have.

    Targets must be the same in both and in every seed (the same test split scored the same way); a
    mismatch is an error that names the files, never a silent subset."""
    sa, sb = by_seed(a, names[0]), by_seed(b, names[1])
    seeds = sorted(set(sa) & set(sb))
    if not seeds:
        return None
    ref = sa[seeds[0]]
    for r in [sa[s] for s in seeds] + [sb[s] for s in seeds]:
        if r.ids != ref.ids:
            raise DataError(f"{r.path} and {ref.path} scored different targets ({len(r.ids)} vs {len(ref.ids)}); "
                            "re-run `g2d ground` for both on the same dataset and split")
    x = np.stack([100 * sa[s].hits[score] for s in seeds])
    y = np.stack([100 * sb[s].hits[score] for s in seeds])
    if len(seeds) > 1:
        return study_stats.compare(x, y, names=names, alpha=alpha, confidence=confidence, n_resamples=n_resamples)
    return study_stats.compare_one_run(x[0], y[0], names=names, alpha=alpha, confidence=confidence,
                                       n_resamples=n_resamples)


def line(c: study_stats.Comparison | None, names: tuple[str, str], score: str = "pointing") -> str:
    """One sentence for a report."""
    what = "pointing game" if score == "pointing" else "pointing game within the body"
    if c is None:
        return f"{names[0]} - {names[1]}, {what}: no pre-training seed grounded by both."
    diff = f"{c.diff:+.1f}"
    ci = "" if c.ci is None else f" [{c.ci[0]:.1f}, {c.ci[1]:.1f}]"
    if c.n_seeds == 1:
        return (f"{names[0]} - {names[1]}, {what} x 100: {diff}{ci}, paired over {c.n_images} phrases, one "
                f"pre-training seed each (the interval is over phrases, not pre-training runs: untested).")
    return (f"{names[0]} - {names[1]}, {what} x 100: {diff}{ci}, paired over {c.n_seeds} pre-training seeds x "
            f"{c.n_images} phrases, {study_stats.format_p(c.p_value)} ({c.p_method}; {c.direction}).")
