"""The `finetune` stage: `g2d train --task T --init I --frac F... --seed S...` fine-tunes downstream models on
label fractions F of task T's train split, starting from encoder I, one cell per (fraction, seed); each keeps the
weights of its best val epoch, is scored on the test split, writes
`metrics/finetune/<task>/<init>/<task>_<frac>_<init>_seed<S>.json`, is logged as its own MLflow run and registered
as `g2d-<task>` (a study variant's as `g2d-<task>-<variant>` under metrics/study/<task>/<variant>/, so that
`models:/g2d-<task>/latest` is always a plain fine-tuning). `evaluate` scores a registered model again.

The cells of one process share what does not change between them: the imports, the data (the whole train
split, loaded once; each cell takes its rows) and, for a frozen encoder, its maps (computed once per image,
g2d/pipeline/finetune/features.py). A cell run alone writes the same metrics file, byte for byte, as in a group.
Every input of every cell is checked (task, fractions, init, data) before a run is opened, so a bad input leaves
neither a run nor a registered version behind.

One process, or several under torchrun (`torchrun --nproc-per-node N --no-python g2d train ...`; DDP,
g2d/pipeline/distributed.py): the task's batch size is the global batch, each rank trains on its share
of every step's rows (g2d/pipeline/finetune/fit.py), so the steps and the result do not depend on the
number of processes. Rank 0 alone loads val and test, validates, decides when to stop, scores the test
split, writes the metrics file and figures, and logs and registers (one MLflow run per cell, tagged
g2d.world_size); the other ranks train, wait at a barrier and return nothing. `compute` applies as in
pre-training: autocast precision (auto = bf16 on CUDA and on CPUs with bf16 instructions, else fp32) and channels_last.
"""

from __future__ import annotations

import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from g2d import tracking
from g2d.config import VARIANT_NAME, Params, resolve_path, to_dict
from g2d.data import labelled, tasks
from g2d.data import manifest as mf
from g2d.errors import ConfigError
from g2d.pipeline import distributed, metrics_files, model_files, preflight, runtime
from g2d.pipeline.finetune import classification, detection, features, initialisation, segmentation
from g2d.pipeline.finetune import fit as loop
from g2d.pipeline.finetune.fit import Setup, TrainingError
from g2d.pipeline.metrics_files import frac_label
from g2d.progress import Reporter, silent

FAMILIES = {"segmentation": segmentation, "classification": classification, "detection": detection}


@dataclass
class FinetuneOutcome:
    metrics: dict
    metrics_path: Path
    run_id: str
    registered: str
    version: int


def registered_name(task: str, variant: str | None = None) -> str:
    return f"g2d-{task}" if variant is None else f"g2d-{task}-{variant}"


def metrics_path(params: Params, task: str, frac: float, init: str, seed: int, variant: str | None = None) -> Path:
    """The cell's metrics file in this project's metrics folder (named by metrics_files.cell_path)."""
    metrics = resolve_path(tracking.project_root(), params.paths.metrics)
    return metrics_files.cell_path(metrics, task, frac, init, seed, variant)


def parse_frac(text: str | float) -> float:
    try:
        frac = float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"--frac {text!r} is not a number; give a label fraction in (0, 1], e.g. 0.01") from None
    if not (0 < frac <= 1):  # NaN fails this too
        raise ConfigError(f"--frac {text}: a label fraction must be in (0, 1], e.g. 0.01 for 1% of the labels")
    return frac


def _load_data(spec, folder: Path, df, image_size: int, reporter: Reporter, splits: tuple[str, ...]):
    counts = {s: int((df["split"] == s).sum()) for s in splits}
    advance = reporter.task(f"load {spec.name} images", sum(counts.values()))
    return {split: labelled.load_split(folder, df, split, spec, image_size, progress=advance) for split in splits}


def run(params: Params, task: str | None = None, frac: float | str = 0.01, init: str | None = None,
        seed: int | None = None, variant: str | None = None, reporter: Reporter = silent) -> FinetuneOutcome | None:
    """One cell: `run_cells` with one fraction and one seed."""
    outcomes = run_cells(params, task, [frac], init, None if seed is None else [seed], variant, reporter)
    return outcomes[0] if outcomes else None


def run_cells(params: Params, task: str | None = None, fracs: list[float | str] = (0.01,), init: str | None = None,
              seeds: list[int] | None = None, variant: str | None = None,
              reporter: Reporter = silent) -> list[FinetuneOutcome]:
    """Fine-tune, test, write, log and register every (seed, fraction) cell. Under torchrun every rank trains its
    share of each batch and only rank 0 does the rest and returns the outcomes (the others return []).
    `variant` names the runs' row in the study (reports/study.md): their metrics go to metrics/study/."""
    ctx = distributed.from_environment()
    try:
        return _run_cells(params, ctx, task, fracs, init, seeds, variant, reporter if ctx.main else silent)
    finally:
        distributed.shutdown(ctx)


def check_shares(ctx: distributed.Context, spec, ft, n_train: int) -> None:
    """Every rank needs a row of the train set (the batch is checked before anything is loaded)."""
    if n_train < ctx.world:
        raise ConfigError(f"{spec.name}: {n_train} train image(s) cannot be shared by {ctx.world} processes (each "
                          "needs at least one); use a larger --frac or fewer processes")


@dataclass
class _Cell:
    frac: float
    seed: int
    chosen: labelled.Fraction  # the label fraction
    train: labelled.Fraction  # what trains: the fraction, or its balanced subset


def _run_cells(params: Params, ctx: distributed.Context, task: str | None, fracs, init: str | None,
               seeds: list[int] | None, variant: str | None, reporter: Reporter) -> list[FinetuneOutcome]:
    ft, compute = params.finetune, params.compute
    spec = tasks.get(task or ft.task)
    fracs = [parse_frac(f) for f in fracs]
    seeds = [params.seed] if not seeds else list(seeds)
    init = init or ft.init
    if variant is not None and not re.match(VARIANT_NAME, variant):
        raise ConfigError(f"--variant {variant!r}: use letters, digits, '-' and '_' (it names the metrics file)")
    root = tracking.project_root()
    folder = tasks.dataset_folder(spec, params, root)
    checked = preflight.check(params, [folder], [resolve_path(root, params.paths.metrics), Path(tempfile.gettempdir())],
                              reporter, tracked=ctx.main)
    df = mf.read_manifest(folder)
    chosen = {frac: labelled.fraction(folder, df, frac) for frac in fracs}
    ctx.shard(_recipe(spec, ft).batch_size, f"finetune.{_section(spec)}.batch_size")  # the global batch splits
    start = initialisation.resolve(init, params, root)
    family = FAMILIES[spec.kind]
    dev = distributed.device(ctx)
    setup = Setup(ctx, dev, runtime.precision(compute.precision, dev), compute.channels_last)
    splits = ("train", "val", "test") if ctx.main else ("train",)  # rank 0 alone validates and tests
    data = {s: d.to(dev) for s, d in _load_data(spec, folder, df, ft.image_size, reporter, splits).items()}
    train = data["train"]
    balanced = spec.kind == "segmentation" and spec.name in ft.segmentation.balanced
    cells = [_Cell(frac, seed, chosen[frac], labelled.balanced(chosen[frac], train, seed) if balanced
                   else chosen[frac]) for seed in seeds for frac in fracs]
    for cell in cells:
        check_shares(ctx, spec, ft, len(cell.train.ids))
    views = family.views(train, ft, params.seed)  # segmentation's augmented copies, drawn once
    cache = features.FeatureCache(ft.feature_cache_gb)
    info = mf.read_info(folder)
    data_hash = info.get("sha256") or mf.dataset_hash(folder)
    outcomes = []
    for cell in cells:
        outcome = _cell(params, ctx, spec, family, start, cell, data, views, cache, setup, variant, folder, info,
                        data_hash, checked, reporter)
        if outcome is not None:
            outcomes.append(outcome)
    return outcomes


def _cell(params: Params, ctx, spec, family, start, cell: _Cell, data, views, cache, setup: Setup,
          variant: str | None, folder: Path, info: dict, data_hash: str, checked, reporter: Reporter
          ) -> FinetuneOutcome | None:
    ft, frac, seed, chosen = params.finetune, cell.frac, cell.seed, cell.chosen
    runtime.seed_everything(seed)  # a random init (and a fresh decoder or head) depends on the seed only
    unet = initialisation.build_unet(start, family.uses_decoder(ft))
    config = {"kind": spec.kind, "task": spec.name, "model": start.model.model_dump(mode="json"),
              "image_size": ft.image_size, "init": start.name, "init_source": start.source,
              "init_sha256": start.sha256, "init_dense": start.dense, "frac": frac, "seed": seed,
              "data_hash": data_hash, "fraction_sha256": chosen.sha256, "train_sha256": cell.train.sha256}
    net = family.wrap(unet, spec, ft, config).to(setup.dev, memory_format=setup.layout)
    encoder_before = {k: v.clone() for k, v in unet.encoder.state_dict().items()}
    frozen = _frozen_encoder(spec, ft)
    inputs = features.inputs(net, unet.encoder, views, data.get("val"), data.get("test"), frozen, cache)
    rows = data["train"].positions(cell.train.ids)
    recipe = _recipe(spec, ft)

    run_info = {"task": spec.name, "kind": spec.kind, "frac": frac, "init": start.name, "seed": seed,
                "variant": variant, "dataset": str(folder), "train_images": len(rows)}
    tags = {"g2d.task": spec.name, "g2d.metric": spec.metric, "g2d.frac": frac_label(frac), "g2d.init": start.name,
            "g2d.init_source": start.source, "g2d.init_sha256": start.sha256, "g2d.seed": str(seed),
            "g2d.fraction_sha256": chosen.sha256, "g2d.fraction_source": chosen.source,
            "g2d.train_sha256": cell.train.sha256, "g2d.world_size": str(ctx.world), "g2d.precision": setup.precision,
            **({"g2d.variant": variant} if variant else {}), **mf.protocol_tags(info.get("protocol"))}
    out_path = metrics_path(params, spec.name, frac, start.name, seed, variant)
    tracked = (tracking.start_run("finetune", config={**to_dict(params), "run": run_info}, data_hash=data_hash,
                                  tags=tags, uri=params.tracking.uri) if ctx.main else tracking.untracked())
    with tracked as tr:
        tr.log_text(checked.text(), preflight.ARTIFACT)
        tr.log_dataset(f"{spec.name}-{folder.name}", source=str(folder / mf.MANIFEST), digest=data_hash,
                       context="training", profile={"train": len(rows), **{s: len(d) for s, d in data.items()
                                                                            if s != "train"}},
                       tags={"fraction": frac_label(frac), "fraction_sha256": chosen.sha256,
                             "train_sha256": cell.train.sha256})
        epoch_rows = loop.epoch_rows(recipe, len(data["train"]))
        steps = recipe.epochs * loop.steps_per_epoch(len(rows), recipe.batch_size, ctx.world, epoch_rows)
        advance = reporter.task(f"fine-tune {spec.name} {frac:.0%}, {start.name}, seed {seed}", steps)
        try:
            result = family.fit(net, inputs, rows, spec, ft, seed, advance, tr.log_metrics, setup, epoch_rows)
        except runtime.NonFiniteLoss as e:
            _non_finite(e, net, data["train"].subset(cell.train.ids), params, out_path, ctx)
        if not ctx.main:
            distributed.barrier(ctx)  # rank 0 tests, writes and registers
            return None
        with runtime.autocast(setup.dev, setup.precision):  # inference in the precision that trained
            test = family.evaluate(net, data["test"], spec, config, inputs.test_maps)
        per_image = {k.removeprefix("per_image_"): test.pop(k) for k in list(test) if k.startswith("per_image_")}
        if frozen:  # the paper's frozen protocol, checked rather than assumed
            unchanged = all(torch.equal(encoder_before[k], v) for k, v in unet.encoder.state_dict().items())
            if not unchanged:
                raise TrainingError(f"{spec.name}: the frozen encoder changed during fine-tuning; this is a bug "
                                    "in g2d, please report it with the params used")
        metrics = {
            "task": spec.name, "kind": spec.kind, "metric": spec.metric, "frac": frac, "init": start.name,
            "init_source": start.source, "init_sha256": start.sha256, "init_dense": start.dense, "seed": seed,
            "variant": variant, "transfer": config.get("transfer"),
            "frozen_encoder": frozen, "test": test, "score": test.get(spec.metric),
            "monitor": recipe.monitor, "val_best": result.best_score, "val_loss": result.best_loss,
            "best_epoch": result.best_epoch, "epochs": result.epochs, "steps": result.steps,
            "stopped_early": result.stopped_early,
            "recipe": {k: getattr(recipe, k) for k in ("batch_size", "epochs", "epoch_length", "lr", "weight_decay",
                                                       "patience")},
            "features": ("cached" if inputs.cached else "per batch") if frozen else "encoder trains",
            "train_images": len(rows), "fraction_images": len(chosen.ids),
            "val_images": len(data["val"]), "test_images": len(data["test"]),
            "dropped": {s: d.dropped for s, d in data.items() if d.dropped},
            "data_hash": data_hash, "fraction_sha256": chosen.sha256, "fraction_source": chosen.source,
            "train_sha256": cell.train.sha256, "train_source": cell.train.source,
            "history": [[round(v, 6) if isinstance(v, float) else v for v in row] for row in result.history],
        }
        if per_image:  # the study pairs two inits image by image (g2d/pipeline/study/stats.py)
            metrics["per_image"] = {"ids": list(data["test"].ids), **per_image}
        # test/score: the task's headline metric under one name for every task, so MLflow's compare view lines
        # up a Dice, a mAP and an AUC (which one: the g2d.metric tag); logged with the model (below)
        logged = {**{f"test/{k}": v for k, v in test.items()}, "test/score": test.get(spec.metric),
                  "best_epoch": result.best_epoch, "val_best": result.best_score}
        logged = {k: v for k, v in logged.items() if isinstance(v, int | float) and math.isfinite(v)}
        # (a NaN score, no positive val image, is in the metrics file, not in MLflow)
        metrics_files.write(out_path, metrics)
        tr.log_artifact(out_path)
        name = registered_name(spec.name, variant)
        with tempfile.TemporaryDirectory(prefix="g2d-finetune-") as tmp:
            title = (f"{spec.name}, {frac:.0%} labels, init {start.name}: test {spec.metric} "
                     f"{test.get(spec.metric, float('nan')):.3f}")
            fig = family.figure(net, data["test"], spec, config, ft.overlays, title,
                                Path(tmp) / f"{out_path.stem}_test.png")
            tr.log_artifact(fig, "figures")
            card = _card(name, config, metrics, tr.run_id)
            model_dir = model_files.save_folder(net, Path(tmp) / "model", {**config, "metrics": test}, card)
            version = tracking.register_model_dir(tr, model_dir, name,
                                                  description=f"{spec.paper}; init {start.name}, {frac:.0%} labels",
                                                  metrics=logged, step=result.epochs)
        outcome = FinetuneOutcome(metrics, out_path, tr.run_id, name, version)
    distributed.barrier(ctx)
    return outcome


def _non_finite(error: runtime.NonFiniteLoss, net, train, params: Params, out_path: Path, ctx) -> None:
    """Name the batch's images and write what it takes to reproduce the step (the weights before it, the batch)
    beside the checkpoints, then stop."""
    ids = [train.ids[i] for i in error.rows]
    path = resolve_path(tracking.project_root(), params.paths.models) / "debug" / \
        f"{out_path.stem}-nonfinite-step{error.step:06d}.pt"
    if ctx.main:
        rows = torch.tensor(error.rows)
        batch = {k: v[rows].cpu() for k, v in (("images", train.images), ("masks", train.masks),
                                                 ("labels", train.labels)) if v is not None}
        for key in ("boxes", "box_labels"):  # detection: per-image lists, what the step's targets were made of
            if getattr(train, key) is not None:
                batch[key] = [getattr(train, key)[i].cpu() for i in error.rows]
        runtime.save_checkpoint(path, {"model": net.state_dict(), "step": error.step, "ids": ids, "batch": batch})
    raise runtime.NonFiniteLoss(
        f"fine-tuning loss is not finite at step {error.step}; the batch's images: {', '.join(ids)}; debug checkpoint "
        f"(weights before the step, the batch) {path}; lower the task's lr or check these images "
        "(`g2d data validate`)", error.step, error.rows) from None


def _section(spec) -> str:
    """The params section of the task family's recipe."""
    return {"segmentation": "segmentation", "classification": "probe", "detection": "detection"}[spec.kind]


def _recipe(spec, ft):
    """The task family's training params: finetune.segmentation, .probe or .detection."""
    return getattr(ft, _section(spec))


def _frozen_encoder(spec, ft) -> bool:
    """The linear probe always keeps the encoder frozen; the others as their params say."""
    return getattr(_recipe(spec, ft), "freeze_encoder", True)


def _card(name: str, config: dict, metrics: dict, run_id: str) -> str:
    test = ", ".join(f"{k} {v:.3f}" for k, v in metrics["test"].items() if isinstance(v, float) and not math.isnan(v))
    return f"""# {name}

{config['kind'].capitalize()} model for `{config['task']}`, fine-tuned by g2d from `{config['init']}`
(`{config['init_source']}`) on {config['frac']:.0%} of the train labels
(fraction sha256 `{config['fraction_sha256']}`, data sha256 `{config['data_hash']}`), seed {config['seed']},
{config['image_size']} px, encoder {'frozen' if metrics['frozen_encoder'] else 'fine-tuned'}.

## Test metrics
{test}

Kept the weights of epoch {metrics['best_epoch']} of {metrics['epochs']} ({metrics['steps']} steps; best val
{metrics['monitor']}). MLflow run `{run_id}`.

## Intended use and limits
Research on label efficiency of pre-trained chest X-ray encoders. Trained on SynthCXR unless the data hash
says otherwise; not for diagnosis. Files: `model.safetensors` (weights only), `config.yaml` (rebuilds it).
"""


# ---------------------------------------------------------------- evaluate a registered model


def load_model(folder: Path):
    """(network in eval mode, config) from a folder written by `run`."""
    from g2d.config import Model
    from g2d.model.towers import build_unet

    config = model_files.read_config(folder)
    kind = config.get("kind", model_files.ENCODER_KIND)
    if kind not in FAMILIES:
        raise model_files.ModelFilesError(
            f"{folder}: a {kind} model, not a fine-tuned downstream model; fine-tune it first "
            "(`g2d train --task TASK --init ...`) and evaluate the registered g2d-<task> model")
    try:
        unet = build_unet(Model.model_validate(config["model"]))
        net = FAMILIES[kind].rewrap(unet, config)
        model_files.load_weights(net, folder / model_files.WEIGHTS)  # safetensors only: never unpickles
    except (KeyError, ValueError, RuntimeError) as e:
        raise model_files.ModelFilesError(f"{folder}: weights and config.yaml do not fit ({e})") from None
    return net.eval(), config


def evaluate(params: Params, task: str | None, model: str, reporter: Reporter = silent) -> dict:
    """Score a fine-tuned model (a folder, or a registered model) on the test split of `task`."""
    spec = tasks.get(task or params.finetune.task)
    root = tracking.project_root()
    folder = tasks.dataset_folder(spec, params, root)
    with model_files.locate(model, {}, root, params.tracking.uri, "--model") as found:
        if found.path is None:
            raise model_files.ModelFilesError(f"--model {model}: a random network is not a fine-tuned model")
        source = found.source
        net, config = load_model(found.path)
    if config["kind"] != spec.kind or list(config.get("classes", [])) != list(spec.labels):
        raise model_files.ModelFilesError(
            f"{source}: a {config['kind']} model for {config.get('task')} ({config.get('classes')}); task "
            f"{spec.name} needs a {spec.kind} model of {list(spec.labels)}")
    df = mf.read_manifest(folder)
    advance = reporter.task(f"load {spec.name} test images", int((df["split"] == "test").sum()))
    dev = runtime.device()
    test = labelled.load_split(folder, df, "test", spec, int(config["image_size"]), progress=advance).to(dev)
    layout = torch.channels_last if params.compute.channels_last else torch.contiguous_format
    net = net.to(dev, memory_format=layout)  # as `run` scored it
    info = mf.read_info(folder)
    data_hash = info.get("sha256") or mf.dataset_hash(folder)
    precision = runtime.precision(params.compute.precision, dev)
    tags = {"g2d.task": spec.name, "g2d.metric": spec.metric, "g2d.model": source, "g2d.precision": precision,
            **mf.protocol_tags(info.get("protocol"))}
    with tracking.start_run("evaluate", config={"task": spec.name, "model": source, "model_config": config},
                            data_hash=data_hash, tags=tags, uri=params.tracking.uri) as tr:
        with runtime.autocast(dev, precision):
            scores = {k: v for k, v in FAMILIES[spec.kind].evaluate(net, test, spec, config).items()
                      if not k.startswith("per_image_")}
        logged = {**{f"test/{k}": v for k, v in scores.items()}, "test/score": scores.get(spec.metric)}
        tr.log_metrics({k: v for k, v in logged.items() if isinstance(v, int | float) and math.isfinite(v)})
    return {"task": spec.name, "model": source, "metric": spec.metric, "test": scores, "run_id": tr.run_id}
