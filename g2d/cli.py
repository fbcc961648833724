"""The `g2d` command line. Each command parses its options, builds a validated config and calls one
library function; a G2DError becomes one line on stderr and exit code 1 (`--debug` shows the
traceback)."""

from __future__ import annotations

import functools
import json
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from g2d import __version__
from g2d.errors import ConfigError, G2DError

app = typer.Typer(help="G2D pre-training of chest X-ray encoders, tracked with DVC and MLflow.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Fetch, render, validate and describe datasets.", no_args_is_help=True)
models_app = typer.Typer(help="Registered models in the MLflow model registry.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")

_state = {"debug": False}

ParamsOpt = Annotated[Path, typer.Option("--params", help="parameters file", show_default=True)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a parameter: KEY=VALUE (repeatable)")]


def handles_errors(fn):
    """Turn library errors into one line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except G2DError as e:
            if _state["debug"]:
                raise
            typer.echo(f"g2d: error: {message(e)}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as e:  # SIGTERM / Ctrl-C; a training stage says where it left its checkpoint
            if _state["debug"]:
                raise
            signum = getattr(e, "signum", signal.SIGINT)
            typer.echo(f"g2d: {e.args[0] if e.args else 'interrupted'}", err=True)
            raise typer.Exit(128 + signum) from None

    return wrapper


def message(error: BaseException) -> str:
    """The error's own message. One raised in a dataloader worker comes back from torch as the same type
    with the worker's traceback in its message; the original message is its last line."""
    text = str(error)
    if "\nOriginal Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def _version(value: bool) -> None:
    if value:
        typer.echo(f"g2d {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks of errors")] = False,
) -> None:
    _state["debug"] = debug


def _params(path: Path, overrides: list[str] | None, defaults_if_missing: bool = False):
    """The validated config. Commands that only need paths (fetch) run on the defaults when the
    default params.yaml is absent; stages never do, so a misplaced cwd is an error, not a surprise."""
    from g2d.config import apply_overrides, load_params, validate

    if defaults_if_missing and path == Path("params.yaml") and not path.exists():
        return validate(apply_overrides({}, overrides or []), "defaults (no params.yaml here)")
    return load_params(path, overrides or [])


# ---------------------------------------------------------------- data


@data_app.command("fetch")
@handles_errors
def data_fetch(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Copy the embedded source files out of torchxrayvision into paths.sources (SHA-256 checked)."""
    from g2d import tracking
    from g2d.config import resolve_path
    from g2d.data import versioning
    from g2d.data.sources import embedded

    cfg = _params(params, set_, defaults_if_missing=True)
    dest = resolve_path(tracking.project_root(), cfg.paths.sources)
    for source, path, copied in embedded.fetch(dest):
        typer.echo(f"{'copied' if copied else 'up to date'}  {path}  sha256:{source.sha256[:12]}  ({source.what})")
    root = tracking.project_root()
    if dest == root / "data" and versioning.commit_tracked(root, "data.dvc"):
        typer.echo(f"{root / 'data.dvc'}: verified and committed to the DVC cache")


@data_app.command("synth")
@handles_errors
def data_synth(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Render the embedded SynthCXR dataset (the `synth` DVC stage)."""
    from g2d.pipeline.datasets import synth
    from g2d.progress import rich_progress

    cfg = _params(params, set_)
    with rich_progress() as reporter:
        outcome = synth.run(cfg, reporter)
    for name, info in outcome.metrics["sets"].items():
        typer.echo(f"{name:13s} {info['rows']:5d} rows  {info['splits']}  sha256:{info['sha256'][:12]}")
    dropped = {k: v for k, v in outcome.metrics["dropped"].items() if v}
    for reason, n in dropped.items():
        typer.echo(f"dropped {n}: {reason}")
    typer.echo(f"data hash {outcome.data_hash[:16]}  in {outcome.seconds:.1f} s  "
               f"-> {outcome.out}  (MLflow run {outcome.run_id})")


@data_app.command("import")
@handles_errors
def data_import(
    source: Annotated[str, typer.Argument(help="mimic-cxr, siim, rsna, chexpert, covidx, object-cxr, ms-cxr or "
                                          "chestxray14")],
    src: Annotated[Path, typer.Option("--src", help="the dataset as downloaded (its official layout)")],
    out: Annotated[Path, typer.Option("--out", help="new dataset folder, e.g. data/siim")],
    protocol: Annotated[str | None, typer.Option("--protocol", help="split protocol, NAME or NAME.vN (default: the "
                                                 "source's paper protocol; list: g2d data protocols)")] = None,
    images: Annotated[Path | None, typer.Option("--images", help="MS-CXR: the MIMIC-CXR-JPG folder holding "
                                                "files/ (default: --src)")] = None,
    reports: Annotated[Path | None, typer.Option("--reports", help="MIMIC-CXR: the folder holding the reports' "
                                                 "files/pXX/pSUBJECT/sSTUDY.txt (default: --src)")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Import a downloaded dataset into a validated dataset folder; rerun the same command to resume."""
    from g2d.pipeline.datasets import data_import
    from g2d.progress import rich_progress

    cfg = _params(params, set_, defaults_if_missing=True)
    protocol = data_import.check(source, protocol)  # a bad name fails here, before the progress display starts
    with rich_progress() as reporter:
        outcome = data_import.run(cfg, source, src, out, protocol, images, reports, reporter)
    r = outcome.result
    typer.echo(f"{r.folder}: {r.rows} images, protocol {r.protocol.label} (sha256:{r.protocol.sha256[:12]})")
    for split, n in r.splits.items():
        paper = r.protocol.paper.get(split)
        typer.echo(f"  {split:5s} {n:7d}" + (f"   paper {paper}" if paper else ""))
    for reason, n in r.dropped.items():
        typer.echo(f"  dropped {n}: {reason}")
    typer.echo(f"  failed {len(r.failures)} (listed in {r.report})")
    typer.echo(f"data hash {r.sha256[:16]}  in {outcome.seconds:.1f} s  (MLflow run {outcome.run_id}); "
               "next: `dvc add data` (data.dvc versions data/), then point a task at it (README, 'Real datasets')")


@data_app.command("protocols")
@handles_errors
def data_protocols(source: Annotated[str | None, typer.Argument(help="only this source's")] = None) -> None:
    """The split protocols shipped with g2d: name, version, source, unit, the paper's sizes, SHA-256."""
    from g2d.data import protocols

    for name in protocols.available():
        p = protocols.load(name)
        if source and p.source != source:
            continue
        sizes = " / ".join(f"{p.paper[s]:,}" for s in ("train", "val", "test") if s in p.paper)
        typer.echo(f"{p.label:26s} {p.source:12s} by {p.unit:7s} {('paper ' + sizes) if sizes else '':30s} "
                   f"sha256:{p.sha256[:12]}")


@data_app.command("validate")
@handles_errors
def data_validate(path: Annotated[Path, typer.Argument(help="dataset folder or its manifest.csv")],
                  workers: Annotated[int, typer.Option("--workers", min=0, help="processes decoding the files, "
                                                       "0 = all cores")] = 0) -> None:
    """Check a dataset: files exist and decode, masks binary and image-sized, boxes inside, splits
    by patient, reports not empty, no duplicates. Exits 1 if anything is wrong."""
    from g2d.data import manifest as mf
    from g2d.progress import rich_progress

    df = mf.read_manifest(path)
    with rich_progress() as reporter:
        report = mf.validate(path, reporter.task(f"validate {path}", len(df)), workers=workers)
    for note in report.notes:
        typer.echo(f"note: {note}")
    if report.ok:
        typer.echo(f"{report.manifest}: {report.rows} rows, no problems")
        return
    for problem in report.problems:
        typer.echo(str(problem))
    summary = ", ".join(f"{n} {check}" for check, n in report.counts().items())
    typer.echo(f"g2d: error: {report.manifest}: {summary}", err=True)
    raise typer.Exit(1)


@data_app.command("info")
@handles_errors
def data_info(path: Annotated[Path, typer.Argument(help="dataset folder or its manifest.csv")],
              as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Counts, splits, label prevalence, fractions and hashes of a dataset."""
    from g2d.data import manifest as mf

    folder = mf.manifest_path(path).parent
    df = mf.read_manifest(folder)
    recorded = mf.read_info(folder)
    info = {
        "manifest": str(folder / mf.MANIFEST),
        "rows": len(df),
        "patients": int(df["patient_id"].nunique()) if "patient_id" in df else None,
        "splits": {str(k): int(v) for k, v in df["split"].value_counts().sort_index().items()} if "split" in df else {},
        "prevalence": {c: round(float(df[c].fillna(0).eq(1).mean()), 4) for c in mf.label_columns(df)},
        "fractions": recorded.get("fractions", {}),
        "protocol": recorded.get("protocol"),
        "sha256": mf.dataset_hash(folder),
    }
    if recorded.get("sha256") and recorded["sha256"] != info["sha256"]:
        info["warning"] = "content differs from the hash recorded in dataset.json"
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(f"{info['manifest']}\n  rows {info['rows']}, patients {info['patients']}")
    typer.echo("  splits " + ", ".join(f"{k} {v}" for k, v in info["splits"].items()))
    if info["prevalence"]:
        typer.echo("  prevalence " + ", ".join(f"{k} {v:.1%}" for k, v in info["prevalence"].items()))
    if info["protocol"]:
        p = info["protocol"]
        typer.echo(f"  protocol {p['name']}.v{p['version']} (by {p['unit']})  sha256:{p['sha256'][:12]}"
                   + (f"  paper sizes {p['paper_sizes']}" if p.get("paper_sizes") else ""))
    for frac, f in info["fractions"].items():
        typer.echo(f"  fraction {frac}: {f['rows']} rows  {f['file']}  sha256:{f['sha256'][:12]}")
    typer.echo(f"  sha256 {info['sha256']}")
    if "warning" in info:
        typer.echo(f"  warning: {info['warning']}", err=True)


# ---------------------------------------------------------------- training


@app.command("pretrain")
@handles_errors
def pretrain(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the latest checkpoint")] = False,
    variant: Annotated[str | None, typer.Option("--variant", help="pre-train this study ablation (study.ablations) "
                                                "instead: models/ablations/<variant>")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="with --variant: pre-train it again with this seed, "
                                             "into models/ablations/<variant>-seed<seed>")] = None,
) -> None:
    """Pre-train G2D on the pre-training manifest and register the model (the `pretrain` DVC stage)."""
    from g2d.pipeline.pretrain import ablations, stage
    from g2d.progress import rich_progress

    if seed is not None and variant is None:
        raise ConfigError("--seed needs --variant (a study ablation's rerun); for the main pre-training use "
                          "--set seed=N")
    cfg = _params(params, set_)
    if variant is not None:  # the ablation's overrides first, the user's --set last
        cfg = _params(params, [*ablations.variant_overrides(cfg, variant, seed), *(set_ or [])])
    with rich_progress() as reporter:
        outcome = stage.run(cfg, resume=resume, reporter=reporter)
    if outcome is None:  # a rank other than 0 of a torchrun job: rank 0 reports
        return
    r, q, nan = outcome.metrics["retrieval"], outcome.metrics["pseudo_mask"], float("nan")
    typer.echo(f"{outcome.metrics['steps']} steps; val retrieval i2t R@1 {r['i2t_R@1']:.3f} R@10 {r['i2t_R@10']:.3f} "
               f"(chance R@1 {outcome.metrics['retrieval_chance']['R@1']:.4f}); pseudo masks: coverage "
               f"{q.get('coverage', nan):.3f} (chance {q.get('coverage_chance', nan):.3f}), pointing "
               f"{q.get('pointing', nan):.3f} (chance {q.get('pointing_chance', nan):.3f})")
    typer.echo(f"registered {cfg.pretrain.register_as} version {outcome.version} (models:/{cfg.pretrain.register_as}/"
               f"latest) from {outcome.model_dir}  (MLflow run {outcome.run_id})")


@app.command("preflight")
@handles_errors
def preflight(
    task: Annotated[str | None, typer.Option("--task", help="also check this fine-tuning task's data")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Run the checks `g2d pretrain` and `g2d train` make before their first step, and say what was checked."""
    from g2d.pipeline import preflight as checks

    report = checks.run(_params(params, set_), task)
    for line in report.lines:
        typer.echo(line)
    typer.echo(f"preflight ok in {report.seconds:.1f} s")


@app.command("train")
@handles_errors
def train(
    task: Annotated[str | None, typer.Option("--task", help="siim-seg, rsna-seg, chexpert-cls, rsna-cls, covidx-cls, "
                                             "rsna-det or object-cxr-det (default: finetune.task)")] = None,
    frac: Annotated[list[str] | None, typer.Option("--frac", help="label fraction of train, in (0, 1]; repeat for "
                                                   "several (default: 0.01)")] = None,
    init: Annotated[str | None, typer.Option("--init", help="a name in finetune.inits (g2d, global, random), a model "
                                             "folder or checkpoint, or a registered model (models:/g2d-encoder/latest)"
                                             )] = None,
    seed: Annotated[list[int] | None, typer.Option("--seed", help="repeat for several (default: params seed)")] = None,
    matrix: Annotated[bool, typer.Option("--matrix", help="every fraction and seed of the matrix: matrix.fractions "
                                         "(study.fractions for a --variant in study.ablations) x matrix.seeds, in "
                                         "one process (the DVC stages)")] = False,
    variant: Annotated[str | None, typer.Option("--variant", help="the run's row in the study (metrics/study/): a "
                                                "name in study.ablations, or e.g. encoder-decoder")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Fine-tune on label fractions (one cell per fraction and seed, one process), test the best val epoch's
    weights, register g2d-<task> (the `finetune` DVC stages)."""
    from g2d.pipeline.finetune import stage as finetune
    from g2d.progress import rich_progress

    cfg = _params(params, set_)
    if matrix:
        if frac or seed:
            raise ConfigError("--matrix runs matrix.fractions x matrix.seeds; give it without --frac and --seed")
        frac = [str(f) for f in (cfg.study.fractions if variant in cfg.study.ablations else cfg.matrix.fractions)]
        seed = list(cfg.matrix.seeds)
    with rich_progress() as reporter:
        outcomes = finetune.run_cells(cfg, task=task, fracs=frac or ["0.01"], init=init, seeds=seed, variant=variant,
                                      reporter=reporter)
    for outcome in outcomes:  # none on a rank other than 0 of a torchrun job: rank 0 reports
        m = outcome.metrics
        typer.echo(f"{m['task']} {m['frac']:.0%} labels ({m['train_images']} images), init {m['init']}, seed "
                   f"{m['seed']}: test {m['metric']} {m['score']:.4f}  (best val {m['monitor']} at epoch "
                   f"{m['best_epoch']}/{m['epochs']}, {m['steps']} steps; val {m['metric']} {m['val_best']:.4f})")
        typer.echo(f"  registered {outcome.registered} version {outcome.version}; metrics {outcome.metrics_path}  "
                   f"(MLflow run {outcome.run_id})")


@app.command("evaluate")
@handles_errors
def evaluate(
    model: Annotated[str, typer.Option("--model", help="registered model (models:/g2d-siim-seg/latest, NAME@ALIAS) "
                                       "or a model folder")],
    task: Annotated[str | None, typer.Option("--task", help="default: finetune.task")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Score a fine-tuned model on the test split of a task."""
    from g2d.pipeline.finetune import stage as finetune
    from g2d.progress import rich_progress

    cfg = _params(params, set_)
    with rich_progress() as reporter:
        out = finetune.evaluate(cfg, task, model, reporter)
    scores = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in out["test"].items())
    typer.echo(f"{out['task']} test, {out['model']}: {scores}  (MLflow run {out['run_id']})")


ModelOpt = Annotated[str, typer.Option("--model", help="pre-trained encoder: g2d / global (finetune.inits), a model "
                                      "folder, or a registered model (models:/g2d-encoder/latest, NAME@ALIAS)")]


@app.command("zeroshot")
@handles_errors
def zeroshot(
    model: ModelOpt = "g2d",
    task: Annotated[str | None, typer.Option("--task", help="synthcxr, siim, rsna, chexpert-5x200 or chestxray14 "
                                             "(default: zeroshot.task)")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Zero-shot classification from '<finding>' vs 'no <finding>' prompts (the `zeroshot` DVC stage)."""
    from g2d.pipeline.zeroshot import stage
    from g2d.progress import rich_progress

    cfg = _params(params, set_)
    with rich_progress() as reporter:
        out = stage.run(cfg, model, task, reporter)
    m, t = out.metrics, out.metrics["test"]
    chance = "chance 0.5" if m["metric"] == "auc" else f"chance {t['chance_accuracy']:.3f}"
    typer.echo(f"{m['task']} {m['split']} ({m['images']} images, {len(m['classes'])} classes), {m['model']}: "
               f"{m['metric']} {m['score']:.4f} ({chance}), F1 {t['f1']:.4f}, accuracy {t['accuracy']:.4f}")
    typer.echo(f"metrics {out.metrics_path}  (MLflow run {out.run_id})")


@app.command("ground")
@handles_errors
def ground(
    model: ModelOpt = "g2d",
    task: Annotated[str | None, typer.Option("--task", help="synthcxr, siim, rsna or ms-cxr "
                                             "(default: zeroshot.grounding.task)")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    variant: Annotated[str | None, typer.Option("--variant", help="ground this study ablation's encoder instead "
                                                "(models/ablations/<variant>)")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="with --variant: its rerun with this seed")] = None,
) -> None:
    """Zero-shot grounding: pointing game, IoU / Dice and CNR of phrase heat maps (the `ground` DVC stage)."""
    from g2d.pipeline.zeroshot import grounding as stage
    from g2d.progress import rich_progress

    if seed is not None and variant is None:
        raise ConfigError("--seed needs --variant: it names an ablation's rerun (models/ablations/<variant>-seed<N>)")
    cfg = _params(params, set_)
    with rich_progress() as reporter:
        out = stage.run(cfg, model, task, reporter, variant=variant, seed=seed)
    m, t = out.metrics, out.metrics["test"]
    typer.echo(f"{m['task']} {m['split']} ({t['targets']} findings on {t['images']} images), {m['model']}: pointing "
               f"{t['pointing']:.4f} (chance {t['pointing_chance']:.4f}; in the body {t['pointing_body']:.4f}, chance "
               f"{t['pointing_body_chance']:.4f}), IoU {t['iou']:.4f}, Dice {t['dice']:.4f} "
               f"at threshold {t['threshold']:g}, CNR {t['cnr']:.4f} (unrelated map {t['cnr_unrelated']:.4f})")
    typer.echo(f"threshold chosen on {m['threshold_chosen_on']}")
    typer.echo(f"metrics {out.metrics_path}, report page {out.page}  (MLflow run {out.run_id})")


def _box(text: str | None) -> tuple[float, float, float, float] | None:

    if text is None:
        return None
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--box {text!r}: expected four numbers x0,y0,x1,y1 in pixels of the image") from None
    if not (x1 > x0 and y1 > y0):
        raise ConfigError(f"--box {text}: needs x1 > x0 and y1 > y0 (x0,y0 is the top-left corner)")
    return x0, y0, x1, y1


@app.command("explain")
@handles_errors
def explain(
    image: Annotated[Path, typer.Argument(help="a DICOM, PNG or JPG chest X-ray")],
    prompt: Annotated[list[str], typer.Option("--prompt", help="a phrase to locate (repeatable)")],
    out: Annotated[Path, typer.Option("--out", help="PNG to draw the heat maps into")] = Path("heatmap.png"),
    box: Annotated[str | None, typer.Option("--box", help="truth box x0,y0,x1,y1 in pixels, drawn and scored")] = None,
    model: ModelOpt = "g2d",
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Where the model looks for each prompt in one image: heat maps with contours over the image."""
    from g2d.inference import explain as draw

    truth = _box(box)
    cfg = _params(params, set_, defaults_if_missing=True)
    pred, path = draw(image, prompt, out, model=model, box=truth, params=cfg)
    hits = pred.pointing(truth) if truth else [None] * len(prompt)
    for p, s, hit in zip(pred.prompts, pred.scores, hits, strict=True):
        where = "" if hit is None else f", maximum {'inside' if hit else 'outside'} the box"
        typer.echo(f"{s:+.4f}  {p!r}{where}")
    typer.echo(f"{path}  ({pred.image.shape[1]} x {pred.image.shape[0]} px, model {pred.model})")


@app.command("report")
@handles_errors
def report(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Gather metrics/finetune/*.json into reports/results.md and the learning curves (the `report` stage)."""
    from g2d.pipeline.study import report as stage

    cfg = _params(params, set_)
    outcome = stage.run(cfg)
    typer.echo(f"{outcome.cells} results -> {outcome.markdown}, {outcome.figure or 'no curves'}; study -> "
               f"{outcome.study}  "
               f"(MLflow run {outcome.run_id})")


@app.command("bench")
@handles_errors
def bench(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    batch: Annotated[int, typer.Option("--batch", min=2, help="pairs per step (paper: 128 on a GPU)")] = 8,
    steps: Annotated[int, typer.Option("--steps", min=1, help="timed steps per variant and round")] = 2,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="interleaved rounds (drifting load hits all "
                                        "variants alike)")] = 2,
    image_size: Annotated[int, typer.Option("--image-size", min=32, help="training resolution")] = 224,
    workers: Annotated[int, typer.Option("--workers", min=0, help="dataloader processes timed")] = 2,
    loader_batches: Annotated[int, typer.Option("--loader-batches", min=1, help="batches the loader is timed "
                                                "on")] = 20,
    model: Annotated[str, typer.Option("--model", help="paper: ResNet-50 + BERT-base-sized text tower; params: "
                                       "the networks of params.yaml")] = "paper",
    flops: Annotated[bool, typer.Option("--flops/--no-flops", help="count FLOPs per step (model FLOPs "
                                        "utilisation on a GPU)")] = True,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the figures to this JSON file")] = None,
) -> None:
    """Time this implementation's pre-training step against the authors' way of training the same model, and
    against the global-only step; the dataloader's rate; peak memory."""
    import json

    from g2d.errors import ConfigError
    from g2d.pipeline.pretrain import bench as stage
    from g2d.progress import rich_progress

    if model not in ("paper", "params"):
        raise ConfigError(f"--model {model!r}: use 'paper' or 'params'")
    cfg = _params(params, set_)
    with rich_progress() as reporter:
        result = stage.run(cfg, batch=batch, steps=steps, rounds=rounds, image_size=image_size, workers=workers,
                           loader_batches=loader_batches, paper_model=model == "paper", count_flops=flops,
                           reporter=reporter)
    typer.echo(stage.table(result))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result.as_dict(), indent=2) + "\n")
        typer.echo(f"figures -> {json_out}")


# ---------------------------------------------------------------- models


@models_app.command("list")
@handles_errors
def models_list(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Registered models with their versions and aliases."""
    from g2d import tracking

    rows = tracking.list_models(uri=_tracking_uri(params, set_))
    if not rows:
        typer.echo("no registered models")
    for row in rows:
        aliases = ", ".join(f"@{a} -> v{v}" for a, v in row["aliases"].items()) or "no aliases"
        typer.echo(f"{row['name']}  versions {row['versions']}  {aliases}  updated {row['last_updated']}")


@models_app.command("pull")
@handles_errors
def models_pull(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@ALIAS, NAME/VERSION or NAME/latest")],
    out: Annotated[Path, typer.Option("--out", help="folder to download into")],
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Download a registered model: g2d's files (safetensors weights, config.yaml, model card) and, for versions
    registered as MLflow models, the MLflow model around them (for mlflow.pyfunc.load_model)."""
    from g2d import tracking

    folder = tracking.pull_model(ref, out, uri=_tracking_uri(params, set_))
    typer.echo(str(folder))
    if folder != out / "model" and (out / "model" / "MLmodel").is_file():
        typer.echo(f"MLflow model (mlflow.pyfunc.load_model): {out / 'model'}")


@models_app.command("export")
@handles_errors
def models_export(
    ref: Annotated[str, typer.Argument(help="NAME[@ALIAS|/VERSION], a model folder, or g2d / global (finetune.inits)")],
    fmt: Annotated[str, typer.Option("--format", help="timm or torchvision")],
    out: Annotated[Path, typer.Option("--out", help="the .safetensors file to write")],
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Write a model's image encoder under timm's or torchvision's own weight names (safetensors)."""
    from g2d import tracking
    from g2d.pipeline import export, model_files

    cfg = _params(params, set_)
    root = tracking.project_root()
    with model_files.locate(ref, cfg.finetune.inits, root, cfg.tracking.uri, "export", export.ExportError) as found:
        if found.path is None:
            raise export.ExportError(f"export {ref}: a random init has no weights to export")
        done = export.export(found.path, fmt, out, found.source)
    typer.echo(f"{done.arch} image encoder of {found.source} ({done.tensors} tensors) -> {done.path}")
    typer.echo(f"load: {done.load}")
    if done.note:
        typer.echo(f"note: {done.note}")


@models_app.command("promote")
@handles_errors
def models_promote(
    name: Annotated[str | None, typer.Argument(help="registered model name (omit both: the rule in params.promote)")
                    ] = None,
    version: Annotated[int | None, typer.Argument(help="version number")] = None,
    alias: Annotated[str | None, typer.Option("--alias", help="alias to point at this version, e.g. champion")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Point an alias at a version (aliases, not the deprecated stages); without NAME and VERSION, let the
    rule in params.promote pick the version and write its model card (the `promote` stage)."""
    from g2d import tracking
    from g2d.errors import ConfigError

    if name is None and version is None and alias is None:
        from g2d.pipeline.study import promotion

        out = promotion.run(_params(params, set_))
        for c in out.candidates:  # the rule's order
            typer.echo(f"  v{c.version.version}: mean {c.mean:.4f} over {len(c.scores)} seeds")
        typer.echo(f"{out.name}@{out.alias} -> version {out.version}; model card {out.card}")
        return
    if name is None or version is None or alias is None:
        raise ConfigError("g2d models promote NAME VERSION --alias ALIAS sets an alias by hand; with no arguments "
                          "the rule in params.promote decides (its alias: promote.alias)")
    tracking.promote(name, version, alias, uri=_tracking_uri(params, set_))
    typer.echo(f"{name}@{alias} -> version {version}")


def _tracking_uri(params: Path, overrides: list[str] | None) -> str | None:
    """The configured store; a missing default params.yaml is fine here (env / default apply)."""
    return _params(params, overrides, defaults_if_missing=True).tracking.uri


def main() -> None:
    """Console entry point."""
    app(prog_name="g2d")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
