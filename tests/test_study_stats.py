"""The study's statistics: intervals that cover, comparisons that neither miss a clear difference nor call
noise significant, and text that is the same on every run."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats

from g2d.errors import DataError
from g2d.pipeline.study.stats import Comparison, Summary, compare, format_cell, format_comparison, summarise


def _covers(ci, value) -> bool:
    return ci[0] <= value <= ci[1]


def test_normal_sample_interval_covers_the_known_mean():
    x = np.random.default_rng(0).normal(0.5, 0.1, 30)  # a typical draw; coverage is tested below
    s = summarise(x, seed=1)
    assert s.n == 30 and s.mean == pytest.approx(x.mean()) and s.sd == pytest.approx(x.std(ddof=1))
    assert s.ci_method == "BCa" and s.ci_note is None and s.note is None
    assert _covers(s.ci, 0.5) and _covers(s.ci, s.mean)
    assert s.ci[1] - s.ci[0] == pytest.approx(s.t_ci[1] - s.t_ci[0], rel=0.25)


def test_coverage_is_near_nominal_at_moderate_n_and_the_t_interval_rescues_small_n():
    rng = np.random.default_rng(2024)
    hits = sum(_covers(summarise(rng.normal(0.5, 0.1, 30), n_resamples=499, seed=k).ci, 0.5) for k in range(300))
    assert 0.90 <= hits / 300 <= 0.98
    # three seeds: the bootstrap interval is far too narrow (the note says so), the t interval is not
    boot = t = 0
    for k in range(300):
        s = summarise(rng.normal(0.5, 0.1, 3), n_resamples=199, seed=k)
        boot += _covers(s.ci, 0.5)
        t += _covers(s.t_ci, 0.5)
    assert boot / 300 < 0.85 and t / 300 > 0.90
    assert "undercovers" in summarise([0.1, 0.2, 0.3]).note


def test_one_value_has_no_interval_and_says_why():
    s = summarise([0.512])
    assert s.n == 1 and s.mean == 0.512 and math.isnan(s.sd)
    assert s.ci is None and s.t_ci is None and s.ci_method is None and "n = 1" in s.ci_note
    assert format_cell(s) == "0.512 (n = 1, no interval)"


def test_constant_values_fall_back_to_percentile_without_nan_or_leaked_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's DegenerateDataWarning / RuntimeWarning must be handled inside
        s = summarise([0.5, 0.5, 0.5])
    assert s.sd == 0 and s.ci == (0.5, 0.5) and s.ci_method == "percentile"
    assert "all values equal" in s.ci_note and s.t_ci == (0.5, 0.5)
    assert format_cell(s) == "0.500 ± 0.000 [0.500, 0.500]"
    two = summarise([0.4, 0.6])  # n = 2: BCa works and spans the two values
    assert two.ci_method == "BCa" and two.ci == (0.4, 0.6)


def test_bad_inputs_are_refused_not_guessed():
    with pytest.raises(DataError, match="non-finite"):
        summarise([0.5, float("nan"), 0.6])
    with pytest.raises(DataError, match="no values"):
        summarise([])
    with pytest.raises(ValueError, match="confidence"):
        summarise([0.5, 0.6], confidence=95)
    with pytest.raises(DataError, match="different seeds"):
        compare({0: 0.5, 1: 0.6}, {0: 0.5, 2: 0.6})
    with pytest.raises(DataError, match="shapes"):
        compare(np.zeros((3, 10)), np.zeros((3, 11)))
    with pytest.raises(DataError, match="rectangular"):
        compare({0: [0.1, 0.2], 1: [0.1]}, {0: [0.1, 0.2], 1: [0.1]})


def test_same_inputs_give_byte_identical_results_and_seed_order_does_not_matter():
    x = [0.51, 0.47, 0.55, 0.49, 0.53]
    assert repr(summarise(x, seed=3)) == repr(summarise(list(x), seed=3))
    assert summarise(x, seed=3) == summarise(x[::-1], seed=3)  # sorted inside: file order is irrelevant
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.6, 0.05, (4, 50)), rng.normal(0.58, 0.05, (4, 50))
    first = compare(a, b, names=("g2d", "global"), seed=5)
    assert repr(first) == repr(compare(a.copy(), b.copy(), names=("g2d", "global"), seed=5))
    assert format_comparison(first) == format_comparison(compare(a, b, names=("g2d", "global"), seed=5))


def _paired(rng, seeds, images, effect, seed_sd=0.01, image_sd=0.03, noise_sd=0.03):
    """Per-image scores of two inits: a shared image difficulty, a per-run offset, noise; b = a - effect."""
    base = 0.6 + rng.normal(0, image_sd, (1, images))
    a = base + rng.normal(0, seed_sd, (seeds, 1)) + rng.normal(0, noise_sd, (seeds, images))
    b = base + rng.normal(0, seed_sd, (seeds, 1)) + rng.normal(0, noise_sd, (seeds, images)) - effect
    return a, b


def test_a_clear_difference_is_significant_and_its_direction_spelled_out():
    a, b = _paired(np.random.default_rng(1), seeds=8, images=200, effect=0.05)
    c = compare(a, b, names=("g2d", "global"), seed=0)
    assert c.n_seeds == 8 and c.n_images == 200 and c.ci_method == "two-way percentile"
    assert c.diff == pytest.approx(float(np.mean(a - b))) and c.ci[0] > 0
    assert c.p_value == pytest.approx(2 / 2**8) and c.p_floor == pytest.approx(2 / 2**8) and c.significant
    assert c.better == "g2d" and c.direction == "g2d better than global, significant at alpha = 0.05"
    assert format_comparison(c).endswith(" *")
    # a loss-like metric: the init with the higher score is the worse one
    loss = compare(a, b, names=("g2d", "global"), higher_is_better=False)
    assert loss.better == "global" and loss.direction.startswith("global better than g2d")


def test_no_difference_is_not_significant():
    a, b = _paired(np.random.default_rng(3), seeds=8, images=200, effect=0.0)
    c = compare(a, b, names=("g2d", "global"), seed=0)
    assert not c.significant and c.p_value > 0.05 and _covers(c.ci, 0.0)
    assert "not significant" in c.direction and not format_comparison(c).endswith("*")


def test_three_seeds_cannot_reach_significance_and_the_result_says_so():
    a, b = _paired(np.random.default_rng(1), seeds=3, images=200, effect=0.05)
    c = compare(a, b, names=("g2d", "global"))
    assert c.p_value == 0.25 and c.p_floor == 0.25 and not c.significant
    assert c.direction == ("g2d better than global, not significant at alpha = 0.05 "
                           "(with 3 seeds p cannot fall below 0.25)")
    assert "3 seeds" in c.note


def test_the_seed_level_test_holds_its_level_where_pooled_image_tests_do_not():
    """No true difference, but each training run has its own offset: a test that pools seeds x images as
    independent calls the lucky seeds significant; the sign-flip over seeds keeps to alpha."""
    rng = np.random.default_rng(11)
    ours = pooled = 0
    for k in range(200):
        a, b = _paired(rng, seeds=6, images=100, effect=0.0, seed_sd=0.03, noise_sd=0.02)
        ours += compare(a, b, n_resamples=99, seed=k).significant
        pooled += stats.wilcoxon((a - b).ravel()).pvalue < 0.05
    assert ours / 200 <= 0.08 and pooled / 200 > 0.5


def test_two_way_interval_covers_when_image_effects_dominate():
    rng = np.random.default_rng(5)
    hits = 0
    for k in range(100):
        d = rng.normal(0, 0.05, (1, 100)) + rng.normal(0, 0.02, (5, 100))  # an image's advantage is shared by seeds
        hits += _covers(compare(d, np.zeros_like(d), n_resamples=299, seed=k).ci, 0.0)
    assert hits / 100 >= 0.9


def test_per_seed_scores_and_mappings_aligned_by_seed():
    a = {2: 0.62, 0: 0.60, 1: 0.64, 3: 0.61}
    b = {0: 0.58, 3: 0.60, 1: 0.61, 2: 0.60}
    c = compare(a, b, names=("g2d", "random"))
    ref = compare([0.60, 0.64, 0.62, 0.61], [0.58, 0.61, 0.60, 0.60], names=("g2d", "random"))
    assert repr(c) == repr(ref)
    assert c.n_images is None and c.ci_method == "BCa" and c.diff == pytest.approx(0.02)
    assert c.p_value == pytest.approx(2 / 16) and c.p_method == "exact sign-flip over 4 seeds"
    same = compare([0.6, 0.6, 0.6], [0.5, 0.5, 0.5])  # identical differences: BCa degenerate, percentile
    assert same.ci == pytest.approx((0.1, 0.1)) and same.ci_method == "percentile" and "BCa degenerate" in same.note
    tie = compare([0.6, 0.5], [0.6, 0.5])
    assert tie.better is None and tie.p_value == 1.0 and tie.direction.startswith("no difference between a and b")


def test_one_seed_is_untested():
    c = compare([0.61], [0.59], names=("g2d", "global"))
    assert c.ci is None and c.p_value is None and not c.significant and "one seed" in c.note
    assert c.direction == "g2d better than global on one seed; untested"
    assert format_comparison(c) == "+0.020 (one seed, untested)"
    assert compare(np.full((1, 5), 0.6), np.full((1, 5), 0.5)).ci is None


def _summary(**kw) -> Summary:
    base = dict(mean=0.5123, sd=0.0312, n=3, confidence=0.95, ci=(0.4781, 0.5467), ci_method="BCa", ci_note=None,
                t_ci=(0.4348, 0.5898), note=None)
    return Summary(**{**base, **kw})


def _comparison(**kw) -> Comparison:
    base = dict(names=("g2d", "global"), diff=0.0214, n_seeds=6, n_images=None, confidence=0.95,
                ci=(0.0043, 0.0381), ci_method="BCa", p_value=0.0123, p_floor=0.03125, p_method="exact",
                alpha=0.05, significant=True, higher_is_better=True, better="g2d", direction="", note=None)
    return Comparison(**{**base, **kw})


def test_formatters_exact_text():
    assert format_cell(_summary()) == "0.512 ± 0.031 [0.478, 0.547]"
    assert format_cell(_summary(), interval="t") == "0.512 ± 0.031 [0.435, 0.590]"
    assert format_cell(_summary(), digits=1) == "0.5 ± 0.0 [0.5, 0.5]"
    assert format_cell(_summary(mean=-0.0001, sd=0.0, ci=(-0.0002, 0.0))) == "0.000 ± 0.000 [0.000, 0.000]"
    assert format_comparison(_comparison()) == "+0.021 [0.004, 0.038], p = 0.012 *"
    assert format_comparison(_comparison(diff=-0.0214, ci=(-0.0381, -0.0043))) == "-0.021 [-0.038, -0.004], p = 0.012 *"
    assert format_comparison(_comparison(p_value=0.25, significant=False)) == "+0.021 [0.004, 0.038], p = 0.250"
    assert format_comparison(_comparison(p_value=0.0004)) == "+0.021 [0.004, 0.038], p < 0.001 *"
    assert format_comparison(_comparison(diff=-0.0001)) == "+0.000 [0.004, 0.038], p = 0.012 *"
    with pytest.raises(ValueError, match="interval"):
        format_cell(_summary(), interval="wald")


def test_one_run_each_is_an_interval_over_items_and_no_test():
    from g2d.pipeline.study.stats import compare_one_run

    a, b = np.r_[np.ones(30), np.zeros(10)], np.r_[np.ones(10), np.zeros(30)]
    c = compare_one_run(a, b, names=("g2d", "global"), n_resamples=999)
    d = a - b
    assert c.diff == pytest.approx(0.5) and (c.n_seeds, c.n_images) == (1, 40)
    assert c.ci == pytest.approx(stats.bootstrap((np.sort(d),), np.mean, n_resamples=999, method="BCa",
                                                 rng=np.random.default_rng(0)).confidence_interval)
    assert c.p_value is None and not c.significant and c.ci_method == "BCa over items"
    assert c.direction == "g2d better than global on these 40 items; one training run each, untested"
    assert "the interval is over items, not over training runs" in c.note
    with pytest.raises(DataError, match="1 paired item"):
        compare_one_run([1.0], [0.0])
    with pytest.raises(DataError, match=r"shapes \(1, 3\) and \(1, 2\)"):
        compare_one_run([1.0, 0.0, 1.0], [0.0, 1.0])
