"""The statistics of the study's tables: a cell's mean, sd and confidence interval over seeds, and whether
one init beats another, paired over seeds and test images.

Pure numpy / scipy, no I/O: the report stage reads the metrics files and calls these. Every function is
deterministic given its `seed`, so a re-run of the report prints byte-identical tables.

Why these choices (the numbers come from seeded simulations of normal data, 95% nominal):
- The interval of a cell is scipy's bootstrap of the mean (BCa; percentile where BCa is degenerate). With
  few seeds any bootstrap interval is too narrow: it covers ~51% at n = 2, ~72% at n = 3, ~81% at n = 5,
  ~90% at n = 10 and ~94% at n = 30, because it cannot know the tails from so few values. A summary
  says so in `note` and also carries the Student-t interval (`t_ci`, exact under normality), so the
  report can print either and say which.
- A comparison's p-value is an exact sign-flip test over seeds (see `compare`): it is valid whatever the
  scores' distribution, but with S seeds no p-value is below 2 / 2**S (0.25 at 3 seeds, 0.031 at 6), so
  a difference can only be called significant at 0.05 with 6 or more seeds. `p_floor` says this.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from g2d.errors import DataError

SMALL_N = 10  # below this many values a bootstrap interval visibly undercovers (see the module docstring)
_EXACT_MAX_SEEDS = 16  # 2**16 sign patterns: enumerated exactly up to here, sampled above


@dataclass(frozen=True)
class Summary:
    """One table cell: the mean over seeds with its spread and interval.

    `ci` is None when there is no interval (n = 1), and `ci_note` then says why; `ci_note` also says
    when the interval is a percentile one because BCa was degenerate. `note` warns of small-n
    undercoverage."""

    mean: float
    sd: float  # ddof = 1; nan for n = 1
    n: int
    confidence: float
    ci: tuple[float, float] | None
    ci_method: str | None  # "BCa", "percentile" or None
    ci_note: str | None
    t_ci: tuple[float, float] | None  # Student-t interval of the mean; None for n = 1
    note: str | None


@dataclass(frozen=True)
class Comparison:
    """Init `names[0]` minus init `names[1]`, paired by seed (and by test image where given).

    `diff` > 0 means names[0] scored higher. `better` is the name of the init that did better in the
    metric's sense (`higher_is_better`), None for a tie; `direction` spells it out with the test's
    verdict. `ci` / `p_value` are None with a reason in `note` when there is a single seed; `note` also
    says when the interval fell back to percentile or when there are few seeds."""

    names: tuple[str, str]
    diff: float
    n_seeds: int
    n_images: int | None  # None when only per-seed scores were given
    confidence: float
    ci: tuple[float, float] | None
    ci_method: str | None  # "BCa" / "percentile" over seeds, or "two-way percentile" over seeds x images
    p_value: float | None
    p_floor: float | None  # the smallest p-value the test can give with this many seeds
    p_method: str | None
    alpha: float
    significant: bool
    higher_is_better: bool
    better: str | None
    direction: str
    note: str | None


def _check_args(confidence: float, n_resamples: int) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples}")


def _finite(values, what: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:  # e.g. seeds scored on different numbers of test images
        raise DataError(f"{what}: not a rectangular array of numbers ({e})") from None
    if arr.size == 0:
        raise DataError(f"{what}: no values")
    bad = ~np.isfinite(arr)
    if bad.any():
        raise DataError(f"{what}: {int(bad.sum())} non-finite value(s) (e.g. an AUC undefined on a split); "
                        "drop or fix those runs before summarising, the statistics do not guess")
    return arr


def _pair(lo, hi) -> tuple[float, float]:
    return float(lo), float(hi)


def _bootstrap_ci(x: np.ndarray, confidence: float, n_resamples: int, seed: int
                  ) -> tuple[tuple[float, float], str, str | None]:
    """scipy's BCa bootstrap interval of the mean of `x` (n >= 2), or its percentile interval from the
    same resamples when BCa is degenerate.

    BCa fails (NaN plus a DegenerateDataWarning) when the jackknife has no spread, e.g. all values equal.
    Warnings are caught and the outcome judged by finiteness, so the caller never gets a silent NaN."""
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings(record=True) as caught, np.errstate(all="ignore"):
        warnings.simplefilter("always")
        res = stats.bootstrap((x,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                              method="BCa", vectorized=True, rng=rng)
    lo, hi = res.confidence_interval
    if np.isfinite(lo) and np.isfinite(hi):
        return _pair(lo, hi), "BCa", None
    why = "all values equal" if np.ptp(x) == 0 else "; ".join(sorted({str(w.message) for w in caught})) or "NaN"
    # the same bootstrap distribution (n_resamples=0 adds none), read with percentiles instead
    with warnings.catch_warnings(record=True), np.errstate(all="ignore"):
        warnings.simplefilter("always")
        res = stats.bootstrap((x,), np.mean, n_resamples=0, confidence_level=confidence, method="percentile",
                              vectorized=True, bootstrap_result=res, rng=rng)
    lo, hi = res.confidence_interval
    if not (np.isfinite(lo) and np.isfinite(hi)):  # cannot happen for finite inputs; never hide it
        raise ArithmeticError(f"bootstrap interval is not finite for {x.tolist()} (BCa: {why})")
    return _pair(lo, hi), "percentile", f"BCa degenerate ({why}): percentile interval"


def _t_ci(x: np.ndarray, confidence: float) -> tuple[float, float]:
    n = len(x)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * float(np.std(x, ddof=1)) / math.sqrt(n)
    m = float(np.mean(x))
    return m - half, m + half


def _small_n_note(n: int, what: str = "values", hint: str = "; t_ci is exact under normality") -> str | None:
    if n >= SMALL_N:
        return None
    return f"{n} {what}: a bootstrap interval undercovers at small n (a nominal 95% one covers ~72% at n = 3){hint}"


def summarise(values: Sequence[float] | np.ndarray, confidence: float = 0.95, n_resamples: int = 9999,
              seed: int = 0) -> Summary:
    """Mean, sd (ddof = 1) and bootstrap interval of the mean of one cell's per-seed scores.

    The values are sorted first, so the result depends on the scores, not on the order the metrics files
    were read in. n = 1 gives no interval (None, with the reason) rather than an invented one."""
    _check_args(confidence, n_resamples)
    x = np.sort(_finite(values, "summarise").ravel())
    n = len(x)
    mean = float(np.mean(x))
    if n == 1:
        return Summary(mean, math.nan, 1, confidence, None, None,
                       "n = 1: one value has no spread, so no interval", None, None)
    ci, method, ci_note = _bootstrap_ci(x, confidence, n_resamples, seed)
    return Summary(mean, float(np.std(x, ddof=1)), n, confidence, ci, method, ci_note, _t_ci(x, confidence),
                   _small_n_note(n))


def _aligned(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Two score arrays paired by seed: mappings seed -> scores are aligned by seed (sorted), sequences
    are taken as already aligned row for row."""
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        if not (isinstance(a, Mapping) and isinstance(b, Mapping)):
            raise ValueError("compare: give both inits' scores as mappings seed -> scores, or both as arrays")
        if set(a) != set(b):
            raise DataError(f"compare: the inits were run with different seeds ({sorted(a)} vs {sorted(b)}); "
                            "a paired comparison needs the same seeds for both")
        seeds = sorted(a)
        a, b = [a[s] for s in seeds], [b[s] for s in seeds]
    x, y = _finite(a, "compare: first init"), _finite(b, "compare: second init")
    if x.shape != y.shape:
        raise DataError(f"compare: the two inits' scores have shapes {x.shape} and {y.shape}; they must be paired "
                        "seed for seed (and test image for test image)")
    if x.ndim not in (1, 2):
        raise DataError(f"compare: scores must be per seed (S,) or per seed and test image (S, N), got {x.shape}")
    return x, y


def _counts(draws: np.ndarray, k: int) -> np.ndarray:
    """(b, m) draws from range(k) -> (b, k) counts per row."""
    b = draws.shape[0]
    return np.bincount((draws + k * np.arange(b)[:, None]).ravel(), minlength=b * k).reshape(b, k).astype(np.float64)


def _two_way_ci(d: np.ndarray, confidence: float, n_resamples: int, seed: int) -> tuple[float, float]:
    """Percentile interval of the grand mean of an (S seeds, N images) difference matrix, resampling seeds
    and images independently, one image resample shared by all seeds of a replicate.

    The images are crossed with the seeds (every seed is scored on the same test set), so an image that
    favours one init does so in every seed; resampling images independently within each seed would
    average that away and understate the test-set variance by about S times (simulated, 5 seeds x 100
    images, image effects dominating: this scheme covers 96%, the nested one 69%). This "pigeonhole"
    bootstrap is slightly conservative in the image terms (McCullagh 2000, Resampling and exchangeable
    arrays) and shares the seed-level undercoverage of any bootstrap with few seeds; BCa has no standard
    form for it, hence percentile."""
    rng = np.random.default_rng(seed)
    s, n = d.shape
    out = np.empty(n_resamples)
    batch = max(1, min(n_resamples, 2_000_000 // max(n, s)))
    for start in range(0, n_resamples, batch):
        b = min(batch, n_resamples - start)
        w_seed = _counts(rng.integers(0, s, (b, s)), s)  # how often each seed is drawn, per replicate
        w_img = _counts(rng.integers(0, n, (b, n)), n)  # and each image
        out[start:start + b] = np.sum(w_seed * (w_img @ d.T), axis=1) / (s * n)
    lo, hi = np.quantile(out, [(1 - confidence) / 2, (1 + confidence) / 2])
    return _pair(lo, hi)


def _sign_flip_p(per_seed: np.ndarray, n_resamples: int, seed: int) -> tuple[float, float, str]:
    """Two-sided sign-flip permutation test of mean(per_seed) = 0: exact (all 2**S sign patterns) for up to
    16 seeds, else `n_resamples` random patterns. Returns p, the smallest attainable p, the method."""
    s = len(per_seed)
    exact = s <= _EXACT_MAX_SEEDS
    res = stats.permutation_test((per_seed,), np.mean, permutation_type="samples", vectorized=True,
                                 n_resamples=2 ** s if exact else n_resamples, alternative="two-sided",
                                 rng=np.random.default_rng(seed))
    if exact:
        return float(res.pvalue), min(1.0, 2.0 / 2 ** s), f"exact sign-flip over {s} seeds"
    return float(res.pvalue), 2.0 / (n_resamples + 1), f"sign-flip over {s} seeds, {n_resamples} random patterns"


def compare(a: Sequence | np.ndarray | Mapping, b: Sequence | np.ndarray | Mapping, *,
            names: tuple[str, str] = ("a", "b"), higher_is_better: bool = True, alpha: float = 0.05,
            confidence: float = 0.95, n_resamples: int = 9999, seed: int = 0) -> Comparison:
    """Paired comparison of two inits: the mean difference a - b, its interval, a p-value, who is better.

    `a` and `b` are per-seed scores (S,) for a metric of the whole test set (AUC, mAP), or per-seed
    per-test-image scores (S, N) for a mean over images (Dice), row s of both being the same seed and
    column i the same image; or mappings seed -> score (or -> per-image scores), aligned by seed.

    Interval: over seeds alone, scipy's BCa bootstrap of the mean per-seed difference (as `summarise`);
    with images, a two-way bootstrap over seeds and images (`_two_way_ci`).

    p-value: an exact sign-flip test over seeds of the per-seed mean differences. Under the null that the
    two inits are the same procedure, the two runs of a seed are exchangeable as whole runs, so flipping
    the sign of a seed's difference is the one symmetry the null gives; it is exact for any distribution
    and each seed's difference already averages the shared test images. Flipping seeds x images cells
    independently, or a Wilcoxon test on per-image differences pooled over seeds, would treat S x N
    dependent cells (one model per seed, the same images in every seed) as independent and call a lucky
    training seed significant (simulated, 6 seeds x 100 images, no true difference, a per-run offset:
    pooled Wilcoxon rejects 76% of the time at 0.05, this test 3.5%). The price: p >= 2 / 2**S, reported
    as `p_floor`.
    """
    _check_args(confidence, n_resamples)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    x, y = _aligned(a, b)
    d = x - y
    per_seed = d if d.ndim == 1 else d.mean(axis=1)
    n_seeds, n_images = len(per_seed), (None if d.ndim == 1 else d.shape[1])
    diff = float(np.mean(d))
    sign = 0 if diff == 0 else (1 if diff > 0 else -1)
    better = None if sign == 0 else names[0] if (sign > 0) == higher_is_better else names[1]
    worse = names[1] if better == names[0] else names[0]
    if n_seeds == 1:
        note = "one seed: the spread between training runs is unknown, so no interval and no test"
        direction = (f"no difference between {names[0]} and {names[1]}" if better is None
                     else f"{better} better than {worse} on one seed; untested")
        return Comparison(tuple(names), diff, 1, n_images, confidence, None, None, None, None, None, alpha,
                          False, higher_is_better, better, direction, note)
    if d.ndim == 1:
        ci, ci_method, ci_note = _bootstrap_ci(np.sort(d), confidence, n_resamples, seed)
    else:
        ci, ci_method, ci_note = _two_way_ci(d, confidence, n_resamples, seed), "two-way percentile", None
    note = "; ".join(t for t in (ci_note, _small_n_note(n_seeds, "seeds", "")) if t) or None
    p, p_floor, p_method = _sign_flip_p(np.sort(per_seed), n_resamples, seed)
    significant = p < alpha
    verdict = f"significant at alpha = {alpha:g}" if significant else f"not significant at alpha = {alpha:g}"
    if not significant and p_floor >= alpha:
        verdict += f" (with {n_seeds} seeds p cannot fall below {p_floor:.3g})"
    if better is None:
        direction = f"no difference between {names[0]} and {names[1]}, {verdict}"
    else:
        direction = f"{better} better than {worse}, {verdict}"
    return Comparison(tuple(names), diff, n_seeds, n_images, confidence, ci, ci_method, p, p_floor, p_method,
                      alpha, significant, higher_is_better, better, direction, note)


def compare_one_run(a: Sequence | np.ndarray, b: Sequence | np.ndarray, *, names: tuple[str, str] = ("a", "b"),
                    higher_is_better: bool = True, alpha: float = 0.05, confidence: float = 0.95,
                    n_resamples: int = 9999, seed: int = 0) -> Comparison:
    """One trained model of each, scored on the same N items (a - b, item for item): the mean difference
    with a bootstrap interval over the items only (BCa, as `summarise`), and no test.

    The interval says how sure the difference is for these two models on these items; it knows nothing of
    the spread between training runs, which `compare` needs two or more seeds to see."""
    _check_args(confidence, n_resamples)
    x, y = _aligned(np.asarray(a, dtype=np.float64)[None], np.asarray(b, dtype=np.float64)[None])
    d = (x - y)[0]
    if len(d) < 2:
        raise DataError(f"compare_one_run: {len(d)} paired item(s); an interval over items needs at least 2")
    diff = float(np.mean(d))
    ci, ci_method, ci_note = _bootstrap_ci(np.sort(d), confidence, n_resamples, seed)
    better = None if diff == 0 else names[0] if (diff > 0) == higher_is_better else names[1]
    worse = names[1] if better == names[0] else names[0]
    direction = (f"no difference between {names[0]} and {names[1]}" if better is None
                 else f"{better} better than {worse} on these {len(d)} items; one training run each, untested")
    note = "; ".join(t for t in ("one training run each: the interval is over items, not over training runs",
                                 ci_note) if t)
    return Comparison(tuple(names), diff, 1, len(d), confidence, ci, f"{ci_method} over items", None, None, None,
                      alpha, False, higher_is_better, better, direction, note)


def _num(x: float, digits: int, sign: bool = False) -> str:
    """Fixed-point text without a "-0.000" (a tiny negative rounded to zero prints as zero)."""
    r = round(float(x), digits) + 0.0
    return f"{r:+.{digits}f}" if sign else f"{r:.{digits}f}"


def format_cell(summary: Summary, digits: int = 3, interval: str = "bootstrap") -> str:
    """"0.512 ± 0.031 [0.478, 0.547]": mean ± sd [interval]; `interval="t"` prints the t interval.
    n = 1: "0.512 (n = 1, no interval)"."""
    if interval not in ("bootstrap", "t"):
        raise ValueError(f"interval must be 'bootstrap' or 't', got {interval!r}")
    if summary.n == 1:
        return f"{_num(summary.mean, digits)} (n = 1, no interval)"
    lo, hi = summary.ci if interval == "bootstrap" else summary.t_ci
    return f"{_num(summary.mean, digits)} ± {_num(summary.sd, digits)} [{_num(lo, digits)}, {_num(hi, digits)}]"


def format_p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def format_comparison(comparison: Comparison, digits: int = 3) -> str:
    """"+0.021 [0.004, 0.038], p = 0.012 *": difference [interval], p-value, "*" when significant.
    One seed: "+0.021 (one seed, untested)"."""
    c = comparison
    head = _num(c.diff, digits, sign=True)
    if c.ci is None or c.p_value is None:
        return f"{head} (one seed, untested)"
    star = " *" if c.significant else ""
    return f"{head} [{_num(c.ci[0], digits)}, {_num(c.ci[1], digits)}], {format_p(c.p_value)}{star}"
