"""The study (reports/study.md): the paper's comparisons on the embedded data, every cell over seeds with a
confidence interval, every difference the paper claims tested paired over seeds (and test images).

Inputs are the metrics files of the DVC stages: metrics/finetune (random vs global-only vs G2D at every
label fraction and seed: Tables 1 and 4) and metrics/study (the pre-training ablations of Tables 5a, 5b / 5d /
5f / 8 and 5e, and encoder + decoder transfer). The statistics are g2d/pipeline/study/stats.py; the paper's
own numbers (g2d/pipeline/study/paper_numbers.py) are printed beside each table for the orderings only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from g2d.config import REFERENCE, TRANSFER_VARIANT, Params
from g2d.data import tasks
from g2d.pipeline import metrics_files
from g2d.pipeline.metrics_files import Result
from g2d.pipeline.pretrain import ablations
from g2d.pipeline.study import grounding_compare, paper_numbers
from g2d.pipeline.study import stats as study_stats

METRIC_TITLES = {"dice": "Dice", "map": "mAP", "auc": "AUC", "accuracy": "ACC"}
INIT_TITLES = {"random": "Random init", "global": "Global only (ConVIRT / CLIP-style)", "g2d": "G2D"}
DICE_NOTE = ("Dice per image gives an image without a finding 1 when nothing is predicted, so a model that predicts "
             "nothing scores the share of such images (78% of SynthCXR's pneumothorax test images, SIIM-ACR's "
             "prevalence; half of its opacity set).")


@dataclass(frozen=True)
class Row:
    key: str  # init (matrix) or variant (study)
    label: str
    study: bool  # read from metrics/study
    paper: str | None = None  # the row's key in the paper table


@dataclass(frozen=True)
class Table:
    title: str
    note: str
    rows: tuple[Row, ...]
    columns: tuple[tuple[str, float], ...]
    comparisons: tuple[tuple[str, str], ...]  # (a, b): a - b, a being the row the paper favours
    paper: dict = field(default_factory=dict)
    ablation: bool = False  # a table of pre-training variants (drawn in the forest plot)


def _label(task: str) -> str:
    return f"{task} {METRIC_TITLES.get(tasks.get(task).metric, '')}"


def tables(params: Params) -> list[Table]:
    """The paper's tables as params configure them (tasks, fractions, which ablations were run)."""
    m, s = params.matrix, params.study
    kinds = {t: tasks.get(t).kind for t in m.tasks}
    dense = tuple((t, f) for t in m.tasks if kinds[t] != "classification" for f in m.fractions)
    cls = tuple((t, f) for t in m.tasks if kinds[t] == "classification" for f in m.fractions)
    inits = tuple(Row(i, INIT_TITLES[i], False, i) for i in INIT_TITLES if i in m.inits)
    pairs = tuple(p for p in (("g2d", "global"), ("g2d", "random"), ("global", "random"))
                  if p[0] in m.inits and p[1] in m.inits)
    out = []
    if dense:
        out.append(Table("Table 1: segmentation Dice and detection mAP, random vs global-only vs G2D",
                         "The `finetune` stage: frozen encoder, the task's test split.", inits, dense, pairs,
                         paper_numbers.TABLE_1_4))
    if cls:
        out.append(Table("Table 4: linear classification (macro AUC)", "The `finetune` stage: linear probe on the "
                         "frozen encoder.", inits, cls, pairs, paper_numbers.TABLE_1_4))
    seg = tuple((t, f) for t in s.transfer_tasks for f in m.fractions)
    if seg and "g2d" in m.inits:
        out.append(Table("Table 1, last rows: encoder-only vs encoder + decoder transfer",
                         "G2D's encoder alone (the `finetune` stage) against the encoder with its pre-trained U-Net "
                         "decoder (the `transfer` stage), both frozen-encoder protocol.",
                         (Row("g2d", "G2D, encoder", False, "encoder"),
                          Row(TRANSFER_VARIANT, "G2D, encoder + decoder", True, "encoder-decoder")),
                         seg, ((TRANSFER_VARIANT, "g2d"),), paper_numbers.TRANSFER))
    cols = tuple((t, f) for t in s.tasks for f in s.fractions)
    heads = params.model.heads
    ablation_tables = [
        ("Table 5a: the dense pretext task", "None is global alignment alone (the paper: encoder-only backbone).",
         [("dense-none", "None (global alignment only)"), ("dense-reconstruction", "Image reconstruction"),
          (REFERENCE, "Pseudo segmentation (G2D)")]),
        ("Tables 5b, 5d, 5f and 8: how the pseudo masks are made",
         "Threshold of in-body attention (the paper: 85th percentile), head aggregation, body mask, smoothing, and "
         "masks shuffled across the batch (no semantic meaning left).",
         [(REFERENCE, "G2D (85th percentile, every step)"), ("threshold-75", "75th percentile"),
          ("threshold-median", "Median"), ("no-head-aggregation", "Without head aggregation"),
          ("no-body-mask", "Without body mask"), ("no-smoothing", "Without smoothing"),
          ("shuffled-masks", "Shuffled masks")]),
        ("Table 5e: attention heads", "Heads of the attention pooling whose map makes the pseudo masks.",
         [("heads-1", "1 head"), ("heads-2", "2 heads"), (REFERENCE, f"{heads} heads (G2D)"), ("heads-8", "8 heads")],
         f"heads-{heads}"),  # the paper's row for the reference: its head count
    ]
    used = {REFERENCE}
    for title, note, rows, *reference_key in ablation_tables:  # config: REFERENCE is in any non-empty variants
        present = [(k, lab) for k, lab in rows if k in s.variants]
        if len(present) < 2:
            continue
        paper_key = {REFERENCE: reference_key[0] if reference_key else REFERENCE}
        table_rows = tuple(Row(k, lab, True, paper_key.get(k, k)) for k, lab in present)
        used |= {k for k, _ in present}
        out.append(Table(title, note, table_rows, cols, tuple((REFERENCE, k) for k, _ in present if k != REFERENCE),
                         paper_numbers.ABLATIONS, ablation=True))
    others = [v for v in s.variants if v not in used]
    if others:
        rows = (Row(REFERENCE, "G2D (reference)", True, None), *(Row(v, v, True, None) for v in others))
        out.append(Table("Other ablations (params study.ablations)", "Variants this study defines beyond the paper's.",
                         rows, cols, tuple((REFERENCE, v) for v in others), ablation=True))
    return out


# ---------------------------------------------------------------- cells and comparisons


@dataclass
class Study:
    params: Params
    matrix: list[Result]
    variants: list[Result]

    def runs(self, row: Row, task: str, frac: float) -> dict[int, Result]:
        seeds = set(self.params.matrix.seeds)
        pool = self.variants if row.study else self.matrix
        return {r.seed: r for r in pool if r.row == row.key and r.task == task and r.frac == frac and r.seed in seeds}

    def values(self, row: Row, task: str, frac: float, key: str = "score") -> list[float]:
        """The cell's per-seed values x 100 (seed order), NaN and missing left out; `key` another field of the
        runs (dice_positive, empty_correct)."""
        runs = self.runs(row, task, frac)
        return [100 * v for v in metrics_files.defined(getattr(r, key) for _, r in sorted(runs.items()))]

    def summary(self, row: Row, task: str, frac: float) -> study_stats.Summary | None:
        values = self.values(row, task, frac)
        if not values:
            return None
        s = self.params.study
        return study_stats.summarise(values, confidence=s.confidence, n_resamples=s.resamples, seed=0)

    def compare(self, a: Row, b: Row, task: str, frac: float, higher_is_better: bool = True
                ) -> tuple[study_stats.Comparison | None, str]:
        """a - b paired by seed, and by test image where both saved per-image Dice for the same images. Seeds
        that one row lacks or scored NaN are left out: the table shows n of the seeds, `paired` says over what."""
        ra, rb = self.runs(a, task, frac), self.runs(b, task, frac)
        seeds = sorted(set(ra) & set(rb))
        seeds = [s for s in seeds if not (math.isnan(ra[s].score) or math.isnan(rb[s].score))]
        if not seeds:
            return None, "not run"
        saved = all(ra[s].per_image is not None and rb[s].per_image is not None for s in seeds)
        images = saved and all(ra[s].ids == rb[s].ids == ra[seeds[0]].ids for s in seeds)
        if images:
            x = {s: 100 * np.asarray(ra[s].per_image) for s in seeds}
            y = {s: 100 * np.asarray(rb[s].per_image) for s in seeds}
        else:
            x, y = {s: 100 * ra[s].score for s in seeds}, {s: 100 * rb[s].score for s in seeds}
        st = self.params.study
        c = study_stats.compare(x, y, names=(a.label, b.label), higher_is_better=higher_is_better, alpha=st.alpha,
                                confidence=st.confidence, n_resamples=st.resamples, seed=0)
        return c, ("seeds x test images" if images else "seeds (the runs' test images differ)" if saved else "seeds")


def _row(table: Table, key: str) -> Row:
    return next(r for r in table.rows if r.key == key)


def _verdict(c: study_stats.Comparison | None, paper_diff: float | None) -> str:
    """Does the paper's ordering hold here? By the interval of the difference (the sign-flip p cannot reach
    0.05 with fewer than 6 seeds)."""
    if c is None:
        return "not run"
    if c.ci is None:
        return "one seed: untested"
    lo, hi = c.ci
    if paper_diff is None or paper_diff == 0:
        return "interval above 0" if lo > 0 else "interval below 0" if hi < 0 else "interval spans 0"
    same = (lo > 0) if paper_diff > 0 else (hi < 0)
    opposite = (hi < 0) if paper_diff > 0 else (lo > 0)
    return "holds" if same else "reversed" if opposite else "not resolved (interval spans 0)"


def _short(row: Row) -> str:
    """The row's name without its explanation in brackets: 'Global only (ConVIRT / CLIP-style)' -> 'Global only'."""
    return row.label.split(" (")[0]


def _col(task: str, frac: float) -> str:
    return f"{_label(task)} {frac:.0%}"


def render_table(study: Study, table: Table) -> tuple[list[str], list[dict]]:
    """Markdown of one table (cells, the paper's numbers, the differences) and its ordering checks."""
    cols = table.columns
    head = "| Method | " + " | ".join(_col(t, f) for t, f in cols) + " |"
    rule = "|---|" + "---|" * len(cols)
    lines = [f"## {table.title}", "", table.note, "", head, rule]
    missing = partial = 0
    seeds = len(study.params.matrix.seeds)
    for row in table.rows:
        cells = []
        for t, f in cols:
            s = study.summary(row, t, f)
            missing += s is None
            partial += s is not None and s.n < seeds
            text = "–" if s is None else study_stats.format_cell(s, digits=1)
            cells.append(text + (f" (n = {s.n} of {seeds})" if s is not None and 1 < s.n < seeds else ""))
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    if missing or partial:
        lines += ["", f"{missing} cell(s) not run yet (–) and {partial} with fewer than {seeds} seeds (a seed not "
                  "run yet, or a score that is not a number): `dvc repro` runs what is missing."]
    if any(tasks.get(t).kind == "segmentation" for t, _ in cols):
        lines += ["", f"What the Dice cells are made of: {DICE_NOTE} Per cell, Dice on the test images with a finding "
                  "(Dice+, x 100, mean ± sd) / the share of images without a finding predicted empty / the pooled "
                  "foreground Dice of all test pixels (x 100, mean):", "", head, rule]
        for row in table.rows:
            cells = []
            for t, f in cols:
                pos, empty, pooled = (study.values(row, t, f, k)
                                      for k in ("dice_positive", "empty_correct", "dice_pooled"))
                cells.append("–" if not pos or not empty or tasks.get(t).kind != "segmentation" else
                             f"{np.mean(pos):.1f}" + (f" ± {np.std(pos, ddof=1):.1f}" if len(pos) > 1 else "")
                             + f" / {np.mean(empty):.0f}%" + (f" / {np.mean(pooled):.1f}" if pooled else ""))
            lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    if table.paper and any(paper_numbers.paper_value(table.paper, r.paper or "", t, f) is not None
                           for r in table.rows for t, f in cols):
        lines += ["", f"The paper's numbers ({paper_numbers.SOURCE}); the data differ, so only the orderings "
                  "compare:", "", head, rule]
        for row in table.rows:
            vals = [paper_numbers.paper_value(table.paper, row.paper or "", t, f) for t, f in cols]
            lines.append(f"| {row.label} | " + " | ".join("–" if v is None else f"{v:.1f}" for v in vals) + " |")
    checks = []
    if table.comparisons:
        lines += ["", "Differences (x 100), paired: mean difference [interval], sign-flip p over seeds; "
                  "'*' p < alpha.", "", "| Difference | " + " | ".join(_col(t, f) for t, f in cols) + " |", rule]
        for a_key, b_key in table.comparisons:
            a, b = _row(table, a_key), _row(table, b_key)
            cells = []
            for t, f in cols:
                c, paired = study.compare(a, b, t, f)
                cells.append("–" if c is None else study_stats.format_comparison(c, digits=1)
                             + (f" (n = {c.n_seeds} of {seeds})" if c is not None and c.n_seeds < seeds else ""))
                pa = paper_numbers.paper_value(table.paper, a.paper or "", t, f) if table.paper else None
                pb = paper_numbers.paper_value(table.paper, b.paper or "", t, f) if table.paper else None
                paper_diff = None if pa is None or pb is None else pa - pb
                checks.append({"table": table.title, "a": _short(a), "b": _short(b), "column": _col(t, f),
                               "paper": paper_diff, "comparison": c, "paired": paired,
                               "verdict": _verdict(c, paper_diff), "ablation": table.ablation})
            lines.append(f"| {_short(a)} − {_short(b)} | " + " | ".join(cells) + " |")
    return lines + [""], checks


def ordering_lines(checks: Sequence[dict]) -> list[str]:
    """The paper's orderings against the study's intervals, one line per difference the paper reports."""
    rows = [c for c in checks if c["paper"] is not None]
    if not rows:
        return []
    out = ["## Which of the paper's orderings hold on SynthCXR", "",
           "The paper's difference against the study's (x 100). 'holds': the interval of the difference lies on "
           "the paper's side of 0; 'reversed': on the other side; 'not resolved': it spans 0.", "",
           "| Table | Difference | Column | Paper | SynthCXR [interval] | Paired over | Verdict |",
           "|---|---|---|---|---|---|---|"]
    for c in rows:
        ours = "–" if c["comparison"] is None else study_stats.format_comparison(c["comparison"], digits=1)
        out.append(f"| {c['table'].split(':')[0]} | {c['a']} − {c['b']} | {c['column']} | {c['paper']:+.1f} | "
                   f"{ours} | {c['paired']} | {c['verdict']} |")
    out += ["", "Tally: " + ", ".join(f"{k} {v}" for k, v in sorted(tally(checks).items())) + ".", ""]
    return out


def tally(checks: Sequence[dict]) -> dict[str, int]:
    """How many of the paper's orderings hold, are reversed, not resolved or not run."""
    out: dict[str, int] = {}
    for c in checks:
        if c["paper"] is not None:
            key = c["verdict"].split(" (")[0]
            out[key] = out.get(key, 0) + 1
    return out


def methods(params: Params, study: Study) -> list[str]:
    s, seeds = params.study, params.matrix.seeds
    floor = 2 / 2 ** len(seeds) if len(seeds) <= 16 else 2 / (s.resamples + 1)  # study_stats._sign_flip_p
    return [
        "# Study: the paper's comparisons on SynthCXR, with seeds and intervals", "",
        f"Generated by `g2d report` from `metrics/finetune` ({len(study.matrix)} runs) and `metrics/study` "
        f"({len(study.variants)} runs). Every cell: test metric x 100, mean ± sd over the seeds {list(seeds)} "
        f"[{s.confidence:.0%} bootstrap interval of the mean, scipy BCa with {s.resamples} resamples]. With "
        f"{len(seeds)} seeds such an interval covers well under {s.confidence:.0%} (about 72% at 3 seeds: "
        "g2d/pipeline/study/stats.py), so read it as a lower bound on the uncertainty.",
        "",
        "Differences are paired: the same seed for both rows, and for Dice the same test images (a two-way "
        "bootstrap over seeds and images). The p-value is a sign-flip test over seeds (exact up to 16 seeds, "
        f"then sampled), valid for any distribution; with {len(seeds)} seeds it cannot fall below {floor:.3g}, so "
        + ("no difference can be significant at alpha = "
           f"{s.alpha:g} with these seeds (add seeds in params matrix.seeds: 6 reach 0.031)." if floor >= s.alpha
           else f"differences with p < {s.alpha:g} are marked '*'."),
        "",
        f"Ablations (Tables 5a, 5b / 5d / 5f / 8, 5e) pre-train each variant on the study's budget "
        f"({', '.join(f'`{b}`' for b in s.budget) or 'the pretrain params'}) from the same seed, then fine-tune "
        f"with {s.transfer.replace('_', ' + ')} transfer on {', '.join(s.tasks)} at "
        f"{', '.join(f'{f:.0%}' for f in s.fractions)} of the labels; they compare with each other, not with "
        "Table 1's G2D (a longer pre-training).", "",
    ]


def grounding_lines(params: Params, folder: Path) -> list[str]:
    """The ablations' zero-shot grounding (`g2d ground --variant`), and the study's grounding_pair compared
    phrase by phrase over every pre-training seed both have."""
    runs, _ = grounding_compare.read(folder)
    runs = [r for r in runs if r.variant is not None and r.task == params.zeroshot.grounding.task]
    if not runs:
        return []
    s = params.study
    order = [v for v in (REFERENCE, *s.variants) if any(r.variant == v for r in runs)]
    order = list(dict.fromkeys(order))  # the reference first, then study.variants' order
    order += sorted({r.variant for r in runs} - set(order))
    out = [f"## Grounding of the ablations ({params.zeroshot.grounding.task} {params.zeroshot.split}, zero-shot)", "",
           "Each ablation's encoder grounds the test findings' phrases as in results.md's Table 2b: the pointing "
           "game x 100 (the heat map's maximum inside the finding; over the image, and with only the body "
           "competing), the mean over its pre-training seeds; chance in brackets.", "",
           "| Variant | Pre-training seeds | Pointing | Pointing in body | Dice |", "|---|---|---|---|---|"]
    for v in order:
        mine = sorted((r for r in runs if r.variant == v), key=lambda r: -1 if r.seed is None else r.seed)
        mean = {k: 100 * float(np.mean([r.test[k] for r in mine]))
                for k in ("pointing", "pointing_chance", "pointing_body", "pointing_body_chance", "dice")}
        seeds = ", ".join("?" if r.seed is None else str(r.seed) for r in mine)
        out.append(f"| {v} | {seeds} | {mean['pointing']:.1f} ({mean['pointing_chance']:.1f}) | "
                   f"{mean['pointing_body']:.1f} ({mean['pointing_body_chance']:.1f}) | {mean['dice']:.1f} |")
    a, b = ([r for r in runs if r.variant == v] for v in s.grounding_pair)
    if a and b:
        out.append("")
        for score in grounding_compare.SCORES:
            c = grounding_compare.compare(a, b, s.grounding_pair, score, confidence=s.confidence, alpha=s.alpha,
                                          n_resamples=s.resamples)
            out.append(f"- {grounding_compare.line(c, s.grounding_pair, score)}")
    return out + [""]


def data_lines(study: Study) -> list[str]:
    """The exact data behind the tables: dataset and label-fraction hashes per task (a mismatch is flagged)."""
    out = ["## Data", "", "| Task | Labels | Dataset sha256 | Fraction sha256 | Runs |", "|---|---|---|---|---|"]
    groups: dict[tuple[str, float], list[Result]] = {}
    for r in study.matrix + study.variants:
        groups.setdefault((r.task, r.frac), []).append(r)
    for (task, frac), runs in sorted(groups.items()):
        data = sorted({r.data_hash or "?" for r in runs})
        fracs = sorted({r.fraction_sha256 or "?" for r in runs})
        flag = " **runs disagree**" if len(data) > 1 or len(fracs) > 1 else ""
        out.append(f"| {task} | {frac:.0%} | {', '.join(f'`{d[:16]}`' for d in data)} | "
                   f"{', '.join(f'`{h[:16]}`' for h in fracs)}{flag} | {len(runs)} |")
    return out + [""]


# ---------------------------------------------------------------- figures


def curves_figure(study: Study, path: Path) -> Path | None:
    """Test metric against label fraction per task: the mean over seeds, the interval as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from g2d.pipeline.figures import save_figure

    m = study.params.matrix
    rows = [Row(i, INIT_TITLES.get(i, i), False) for i in m.inits]
    task_names = [t for t in m.tasks if any(r.task == t for r in study.matrix)]
    if not task_names:
        return None
    fig, axes = plt.subplots(1, len(task_names), figsize=(3.8 * len(task_names), 3.3), dpi=100, squeeze=False)
    for ax, t in zip(axes[0], task_names, strict=True):
        for row in rows:
            pts = [(f, study.summary(row, t, f)) for f in m.fractions]
            pts = [(f, s) for f, s in pts if s is not None]
            if not pts:
                continue
            xs = [f for f, _ in pts]
            line = ax.plot(xs, [s.mean for _, s in pts], marker="o", label=_short(row))[0]
            banded = [(f, s) for f, s in pts if s.ci is not None]
            if banded:
                ax.fill_between([f for f, _ in banded], [s.ci[0] for _, s in banded], [s.ci[1] for _, s in banded],
                                color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xscale("log")
        ax.set_xticks(list(m.fractions), [f"{f:.0%}" for f in m.fractions])
        ax.minorticks_off()
        ax.set_xlabel("labels used (share of train)")
        ax.set_ylabel(f"{METRIC_TITLES.get(tasks.get(t).metric, 'score')} x 100")
        ax.set_title(t, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Mean over {len(m.seeds)} seeds, band: {study.params.study.confidence:.0%} bootstrap interval",
                 fontsize=10)
    return save_figure(fig, path)


def ablations_figure(checks: Sequence[dict], path: Path) -> Path | None:
    """Each ablation's difference from the reference with its interval (a forest plot; one seed: the point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from g2d.pipeline.figures import save_figure

    rows = [c for c in checks if c["ablation"] and c["comparison"] is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.4), dpi=100)
    labelled = False
    for i, c in enumerate(rows):
        cmp = c["comparison"]
        err = None if cmp.ci is None else [[cmp.diff - cmp.ci[0]], [cmp.ci[1] - cmp.diff]]
        ax.errorbar([cmp.diff], [i], xerr=err, fmt="o", color="tab:blue", capsize=3,
                    label=None if i else "SynthCXR, with its interval")
        if c["paper"] is not None:
            ax.plot([c["paper"]], [i], marker="x", color="tab:red", linestyle="none",
                    label=None if labelled else "the paper")
            labelled = True
    ax.axvline(0, color="grey", linewidth=1)
    ax.set_yticks(range(len(rows)), [f"{c['a']} − {c['b']} ({c['column']})" for c in rows],
                  fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("difference x 100 (> 0: the reference, G2D, is better)")
    fig.suptitle("Reference minus each ablation, with its interval; x: the paper", fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


# ---------------------------------------------------------------- the report


@dataclass
class StudyOutcome:
    markdown: Path
    figures: list[Path]
    checks: list[dict]
    curves: Path | None  # reports/learning_curves.png, None without matrix results


def write(params: Params, metrics: Path, out: Path) -> StudyOutcome:
    """reports/study.md and its figures (reports/study/) from the metrics files."""
    study = Study(params, metrics_files.read_results(metrics / "finetune", study=False),
                  metrics_files.read_results(metrics / "study", study=True))
    figures_dir = out / "study"
    figures_dir.mkdir(parents=True, exist_ok=True)
    lines = methods(params, study)
    checks: list[dict] = []
    for table in tables(params):
        body, found = render_table(study, table)
        lines += body
        checks += found
    lines += ordering_lines(checks)
    curves = curves_figure(study, out / "learning_curves.png")  # also results.md's and DVC's plot
    figures = [f for f in (curves, ablations_figure(checks, figures_dir / "ablations.png")) if f is not None]
    if figures:
        lines += ["## Figures", ""] + [f"![{f.stem}]({f.relative_to(out).as_posix()})" for f in figures] + [""]
    lines += grounding_lines(params, metrics / ablations.FOLDER / ablations.GROUNDING)
    lines += data_lines(study)
    md = out / "study.md"
    md.write_text("\n".join(lines))
    return StudyOutcome(md, figures, checks, curves)
