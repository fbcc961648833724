"""G2D against global-only on phrase grounding, paired by phrase and pre-training seed: the reader of
`g2d ground`'s per-target hits, the comparison's numbers and its refusals, and the study's section."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from g2d.errors import DataError
from g2d.pipeline.study import comparisons as study
from g2d.pipeline.study import grounding_compare
from g2d.pipeline.study import stats as study_stats
from tests.test_study import _params

IDS = [f"img{i // 2}|phrase {i % 2}" for i in range(40)]


def write_grounding(folder: Path, name: str, hits: list[int], *, variant: str | None, seed: int | None,
                    model: str = "m", ids: list[str] = IDS, per_target: bool = True) -> Path:
    m = {"task": "synthcxr", "model": model, "variant": variant, "model_seed": seed,
         "test": {"pointing": float(np.mean(hits)), "pointing_chance": 0.05, "pointing_body": float(np.mean(hits)),
                  "pointing_body_chance": 0.07, "dice": 0.1}}
    if per_target:
        m["per_target"] = {"id": ids, "pointing": hits, "pointing_body": hits}
    folder.mkdir(parents=True, exist_ok=True)
    (path := folder / f"synthcxr_{name}.json").write_text(json.dumps(m))
    return path


def _hits(rate: float, rng: np.random.Generator) -> list[int]:
    return [int(v) for v in rng.random(len(IDS)) < rate]


def test_one_seed_each_is_an_interval_over_phrases_without_a_test(tmp_path):
    a = [1] * 30 + [0] * 10
    b = [1] * 10 + [0] * 30
    write_grounding(tmp_path, "g2d", a, variant=None, seed=42, model="g2d")
    write_grounding(tmp_path, "global", b, variant=None, seed=42, model="global")
    write_grounding(tmp_path, "old", b, variant=None, seed=42, per_target=False)
    runs, without = grounding_compare.read(tmp_path)
    assert [p.name for p in without] == ["synthcxr_old.json"]  # an older file is counted, not read as zeros
    g2d, glob = ([r for r in runs if r.model == m] for m in ("g2d", "global"))
    c = grounding_compare.compare(g2d, glob, ("G2D", "global-only"), n_resamples=999)
    assert c.diff == pytest.approx(50.0) and c.n_seeds == 1 and c.n_images == 40
    assert c.ci[0] < 50 < c.ci[1] and c.ci[0] > 0 and c.p_value is None  # 20 of 40 phrases +100, none -100
    text = grounding_compare.line(c, ("G2D", "global-only"))
    assert text.startswith("G2D - global-only, pointing game x 100: +50.0 [")
    assert "paired over 40 phrases, one pre-training seed each (the interval is over phrases" in text


def test_seeds_and_phrases_give_the_two_way_interval_and_the_sign_flip_test(tmp_path):
    rng = np.random.default_rng(0)
    for seed in (42, 43, 44):
        write_grounding(tmp_path, f"a-{seed}", _hits(0.6, rng), variant="g2d", seed=seed)
        write_grounding(tmp_path, f"b-{seed}", _hits(0.2, rng), variant="dense-none", seed=seed)
    runs, _ = grounding_compare.read(tmp_path)
    a, b = ([r for r in runs if r.variant == v] for v in ("g2d", "dense-none"))
    c = grounding_compare.compare(a, b, ("g2d", "dense-none"), n_resamples=999)
    x = np.stack([100 * r.hits["pointing"] for r in sorted(a, key=lambda r: r.seed)])
    y = np.stack([100 * r.hits["pointing"] for r in sorted(b, key=lambda r: r.seed)])
    same = study_stats.compare(x, y, names=("g2d", "dense-none"), n_resamples=999)
    assert (c.diff, c.ci, c.p_value, c.n_seeds, c.n_images) == (same.diff, same.ci, same.p_value, 3, 40)
    assert c.p_value == pytest.approx(0.25)  # all three seeds favour g2d: the exact floor at 3 seeds
    assert "paired over 3 pre-training seeds x 40 phrases, p = 0.250 (exact sign-flip over 3 seeds" in (
        grounding_compare.line(c, ("g2d", "dense-none")))


def test_different_targets_or_a_repeated_seed_are_refused_by_name(tmp_path):
    write_grounding(tmp_path, "a", [1] * 40, variant="g2d", seed=42)
    write_grounding(tmp_path, "b", [0] * 39, variant="dense-none", seed=42, ids=IDS[:39])
    runs, _ = grounding_compare.read(tmp_path)
    a, b = ([r for r in runs if r.variant == v] for v in ("g2d", "dense-none"))
    with pytest.raises(DataError, match=r"synthcxr_b.json and .*synthcxr_a.json scored different targets \(39 vs "
                                        r"40\); re-run `g2d ground` for both"):
        grounding_compare.compare(a, b, ("g2d", "dense-none"))
    write_grounding(tmp_path, "a2", [1] * 40, variant="g2d", seed=42)
    runs, _ = grounding_compare.read(tmp_path)
    with pytest.raises(DataError, match=r"two g2d runs with pre-training seed 42; delete one"):
        grounding_compare.compare([r for r in runs if r.variant == "g2d"], b, ("g2d", "dense-none"))
    assert grounding_compare.compare(a, [], ("g2d", "dense-none")) is None


def test_a_broken_grounding_file_is_named(tmp_path):
    path = write_grounding(tmp_path, "a", [1] * 40, variant="g2d", seed=42)
    m = json.loads(path.read_text())
    m["per_target"]["pointing"] = m["per_target"]["pointing"][:3]
    path.write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"synthcxr_a.json: not a g2d grounding metrics file \(ValueError: "
                                        r"per_target has 40 ids but \[3, 40\] hits\)"):
        grounding_compare.read(tmp_path)


def test_study_lists_each_ablations_grounding_and_compares_the_pair(tmp_path):
    params = _params(resamples=199)
    folder = tmp_path / "ablations" / "grounding"
    rng = np.random.default_rng(1)
    for v in ("g2d", "dense-none", "heads-1"):
        for seed in ((42, 43, 44) if v != "heads-1" else (42,)):
            write_grounding(folder, f"{v}-{seed}", _hits(0.5 if v == "g2d" else 0.25, rng), variant=v, seed=seed)
    lines = study.grounding_lines(params, folder)
    text = "\n".join(lines)
    assert lines[0] == "## Grounding of the ablations (synthcxr test, zero-shot)"
    assert "| g2d | 42, 43, 44 |" in text and "| heads-1 | 42 |" in text
    assert text.index("| g2d |") < text.index("| dense-none |") < text.index("| heads-1 |")  # reference first
    assert "- g2d - dense-none, pointing game x 100: +" in text and "3 pre-training seeds x 40 phrases" in text
    assert study.grounding_lines(params, tmp_path / "none") == []


def test_results_compare_g2d_and_global_only_phrase_by_phrase(tmp_path):
    from g2d.pipeline.study import report

    params = _params(resamples=199)
    write_grounding(tmp_path, "g2d", [1] * 30 + [0] * 10, variant=None, seed=42, model="g2d")
    write_grounding(tmp_path, "global", [1] * 10 + [0] * 30, variant=None, seed=42, model="global")
    lines = report.grounding_pairs(params, tmp_path, ["global", "g2d"])
    assert lines[0].startswith("G2D - global-only, pointing game x 100: +50.0 [")
    assert "paired over 40 phrases, one pre-training seed each" in lines[0]
    assert lines[1].startswith("G2D - global-only, pointing game within the body x 100: +50.0 [")
    assert report.grounding_pairs(params, tmp_path, ["g2d"]) == []  # one encoder: nothing to pair
