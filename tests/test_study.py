"""The study report (reports/study.md): tables over seeds with intervals, paired differences, the paper's
orderings checked, figures; on metrics files generated here (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from g2d.config import Params, load_params
from g2d.errors import DataError
from g2d.pipeline.study import comparisons as study

ROOT = Path(__file__).resolve().parents[1]


def _params(**study_overrides) -> Params:
    """params.yaml with the whole study switched on (the main job leaves it to `dvc exp run`)."""
    whole = {"variants": list(load_params(ROOT / "params.yaml").study.ablations), "transfer_tasks": ["siim-seg"]}
    raw = ["study.resamples=199"] + [f"study.{k}={json.dumps(v)}" for k, v in {**whole, **study_overrides}.items()]
    return load_params(ROOT / "params.yaml", raw)


def write_metrics(folder: Path, task: str, frac: float, row: str, seed: int, score: float, *, variant: bool = False,
                  per_image: list[float] | None = None, metric: str = "dice") -> Path:
    name = f"{task}_{frac!r}_{row}_seed{seed}.json"
    m = {"task": task, "kind": "segmentation", "metric": metric, "frac": frac, "init": "x" if variant else row,
         "variant": row if variant else None, "seed": seed, "score": score, "data_hash": "d" * 64,
         "fraction_sha256": f"{frac}".ljust(64, "f"), "test": {metric: score}}
    if metric == "dice":  # what the Dice is made of: Dice on images with a finding, empty ones left empty
        m["test"].update(dice_positive=score / 2, empty_correct=0.9)
    if per_image is not None:
        m["per_image"] = {"ids": [f"img{i}" for i in range(len(per_image))], "dice": per_image}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(m))
    return path


def fake_study(metrics: Path, params: Params, effect: float = 0.1, images: int = 20) -> None:
    """Every cell of the matrix and the study; G2D better than global better than random by `effect`, the
    ablations worse than the reference, per-image Dice for segmentation tasks."""
    rng = np.random.default_rng(0)
    base = {"random": 0.2, "global": 0.2 + effect, "g2d": 0.2 + 2 * effect}
    img = rng.normal(0, 0.05, images)
    for task in params.matrix.tasks:
        seg = task.endswith("-seg")
        metric = {"siim-seg": "dice", "rsna-seg": "dice", "chexpert-cls": "auc", "rsna-det": "map"}[task]
        for frac in params.matrix.fractions:
            for init, b in base.items():
                for seed in params.matrix.seeds:
                    run = b + rng.normal(0, 0.01)
                    per = list(np.clip(run + img + rng.normal(0, 0.02, images), 0, 1)) if seg else None
                    score = float(np.mean(per)) if per else run
                    write_metrics(metrics / "finetune", task, frac, init, seed, score, per_image=per, metric=metric)
    for task in params.study.tasks:
        for frac in params.study.fractions:
            for i, v in enumerate(params.study.variants):
                for seed in params.matrix.seeds:
                    run = 0.5 - (0 if v == "g2d" else effect * (1 + i % 3)) + rng.normal(0, 0.01)
                    per = list(np.clip(run + img + rng.normal(0, 0.02, images), 0, 1))
                    write_metrics(metrics / "study", task, frac, v, seed, float(np.mean(per)), variant=True,
                                  per_image=per)
    for task in params.study.transfer_tasks:
        for frac in params.matrix.fractions:
            for seed in params.matrix.seeds:
                per = list(np.clip(0.6 + img + rng.normal(0, 0.02, images), 0, 1))
                write_metrics(metrics / "study", task, frac, study.TRANSFER_VARIANT, seed, float(np.mean(per)),
                              variant=True, per_image=per)


def test_study_has_every_table_with_intervals_and_the_orderings(tmp_path):
    params = _params()
    fake_study(tmp_path / "metrics", params)
    out = study.write(params, tmp_path / "metrics", tmp_path / "reports")
    md = out.markdown.read_text()
    for title in ("Table 1:", "Table 4:", "Table 1, last rows: encoder-only", "Table 5a:", "Tables 5b, 5d, 5f and 8",
                  "Table 5e:", "Which of the paper's orderings hold", "## Data"):
        assert title in md, title
    # a cell: mean ± sd [interval], x 100
    assert "| G2D | " in md and " ± " in md and "[" in md
    dice_parts = md.split("What the Dice cells are made of")[1].split("## ")[0]
    assert "| G2D | " in dice_parts and " / 90% |" in dice_parts and " ± " in dice_parts
    # 3 seeds: the sign-flip test cannot reach 0.05, and the report says so
    assert "cannot fall below 0.25" in md
    # G2D was made better than global everywhere: every such ordering of the paper holds
    g2d_global = [c for c in out.checks if c["a"] == "G2D" and c["b"] == "Global only"]
    assert g2d_global and all(c["verdict"] == "holds" for c in g2d_global)
    # Dice differences are paired over images too, AUC / mAP over seeds only
    paired = {c["column"].split()[0]: c["paired"] for c in g2d_global}
    assert paired["siim-seg"] == "seeds x test images" and paired["chexpert-cls"] == "seeds"
    # the ablations were made worse than the reference: shuffled masks lose, as in the paper
    shuffled = next(c for c in out.checks if c["b"] == "Shuffled masks")
    assert shuffled["verdict"] == "holds" and shuffled["paper"] == pytest.approx(65.6 - 50.9)
    assert {p.name for p in out.figures} == {"learning_curves.png", "ablations.png"}
    assert "paper" in md.lower() and "only the orderings" in md


def test_a_reversed_ordering_is_called_reversed(tmp_path):
    params = _params()
    fake_study(tmp_path / "metrics", params, effect=-0.1)  # random > global > G2D
    out = study.write(params, tmp_path / "metrics", tmp_path / "reports")
    g2d_random = [c for c in out.checks if c["a"] == "G2D" and c["b"] == "Random init"]
    assert g2d_random and all(c["verdict"] == "reversed" for c in g2d_random)


def test_missing_cells_are_counted_not_hidden(tmp_path):
    params = _params()
    fake_study(tmp_path / "metrics", params)
    for path in (tmp_path / "metrics" / "finetune").glob("siim-seg_0.01_g2d_seed*.json"):
        path.unlink()
    md = study.write(params, tmp_path / "metrics", tmp_path / "reports").markdown.read_text()
    assert "1 cell(s) not run yet" in md


def test_one_seed_gives_no_interval_and_says_so(tmp_path):
    variants = json.dumps(list(_params().study.variants))
    params = load_params(ROOT / "params.yaml", ["matrix.seeds=[42]", "promote.min_seeds=1", "study.resamples=199",
                                                f"study.variants={variants}", 'study.transfer_tasks=["siim-seg"]'])
    fake_study(tmp_path / "metrics", params)
    out = study.write(params, tmp_path / "metrics", tmp_path / "reports")
    assert "(n = 1, no interval)" in out.markdown.read_text()
    assert all(c["verdict"] in ("one seed: untested", "not run") for c in out.checks)
    assert "ablations.png" in {f.name for f in out.figures}  # the points, without interval bars


def test_a_broken_metrics_file_is_named(tmp_path):
    params = _params()
    bad = tmp_path / "metrics" / "study" / "siim-seg_0.01_g2d_seed42.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"task": "siim-seg"}')
    with pytest.raises(DataError, match=r"siim-seg_0.01_g2d_seed42.json: not a g2d fine-tuning metrics file"):
        study.write(params, tmp_path / "metrics", tmp_path / "reports")


def test_different_test_images_fall_back_to_pairing_by_seed(tmp_path):
    params = _params()
    fake_study(tmp_path / "metrics", params)
    path = next((tmp_path / "metrics" / "finetune").glob("siim-seg_0.01_global_seed42.json"))
    m = json.loads(path.read_text())
    m["per_image"]["ids"][0] = "another"
    path.write_text(json.dumps(m))
    out = study.write(params, tmp_path / "metrics", tmp_path / "reports")
    c = next(c for c in out.checks if c["a"] == "G2D" and c["b"] == "Global only" and c["column"] ==
             "siim-seg Dice 1%")
    assert c["paired"] == "seeds (the runs' test images differ)"


def test_two_files_of_one_run_are_refused(tmp_path):
    params = _params()
    fake_study(tmp_path / "metrics", params)
    folder = tmp_path / "metrics" / "finetune"
    (folder / "copy_of_seed42.json").write_text((folder / "siim-seg_0.01_g2d_seed42.json").read_text())
    with pytest.raises(DataError, match=r"siim-seg_0.01_g2d_seed42.json: the same run \(siim-seg, 0.01 of the labels, "
                                        r"g2d, seed 42\) as copy_of_seed42.json; keep one"):
        study.write(params, tmp_path / "metrics", tmp_path / "reports")


def test_study_params_are_validated():
    from g2d.errors import ConfigError

    with pytest.raises(ConfigError, match=r"study.variants \['nope'\] are not names in study.ablations"):
        _params(variants=["g2d", "nope"])
    with pytest.raises(ConfigError, match=r"'paths.models=x' is not a KEY=VALUE override of seed, model, compute"):
        load_params(ROOT / "params.yaml", ['study.ablations={"bad": ["paths.models=x"]}'])
    with pytest.raises(ConfigError, match=r"matrix.seeds.*distinct"):
        load_params(ROOT / "params.yaml", ["matrix.seeds=[1, 1]"])
    with pytest.raises(ConfigError, match=r"study.variants \['heads-1', 'heads-2'\]: add 'g2d', the reference"):
        _params(variants=["heads-1", "heads-2"])
    with pytest.raises(ConfigError, match=r"study.transfer_tasks.0.*'siim-seg' or 'rsna-seg'"):
        _params(transfer_tasks=["chexpert-cls"])
    with pytest.raises(ConfigError, match=r"study.transfer_tasks \['rsna-seg'\] are not in matrix.tasks"):
        _params(transfer_tasks=["rsna-seg"])
    with pytest.raises(ConfigError, match=r"promote ranks by rsna-seg at 0.01 of the labels, which the matrix does "
                                          r"not run"):
        load_params(ROOT / "params.yaml", ["promote.task=rsna-seg"])


def test_promote_needs_as_many_seeds_as_it_asks_for():
    from g2d.errors import ConfigError

    with pytest.raises(ConfigError, match=r"promote.min_seeds = 3 but matrix.seeds has 2: no version could qualify"):
        load_params(ROOT / "params.yaml", ["matrix.seeds=[42, 43]"])
    with pytest.raises(ConfigError, match=r"ablation name 'encoder-decoder' is the transfer stage's row"):
        load_params(ROOT / "params.yaml", ['study.ablations={"encoder-decoder": []}'])


def test_a_cell_with_fewer_seeds_is_marked(tmp_path):
    params = _params()
    fake_study(tmp_path / "metrics", params)
    (tmp_path / "metrics" / "finetune" / "siim-seg_0.01_g2d_seed44.json").unlink()
    md = study.write(params, tmp_path / "metrics", tmp_path / "reports").markdown.read_text()
    assert "(n = 2 of 3)" in md and "0 cell(s) not run yet (–) and 1 with fewer than 3 seeds" in md
    diff = next(line for line in md.splitlines() if line.startswith("| G2D − Global only |") and "n = 2 of 3" in line)
    assert diff.count("(n = 2 of 3)") == 1  # the paired difference too says it lost a seed


def test_grounding_pair_and_seeds_are_validated():
    from g2d.errors import ConfigError

    with pytest.raises(ConfigError, match=r"grounding_pair names \['nope'\], not in study.ablations"):
        _params(grounding_pair=["g2d", "nope"])
    with pytest.raises(ConfigError, match=r"grounding_seeds \[43, 43\] repeats a seed"):
        _params(grounding_seeds=[43, 43])
