"""The `pretrain` stage: train G2D on the pre-training manifest, log it to MLflow, write
`metrics/pretrain.json`, export the model folder and register it as `g2d-encoder`.

One process, or several under torchrun (DDP, g2d/pipeline/distributed.py): `pretrain.batch_size` is the
global batch, so the steps, the schedule and the InfoNCE negatives (gathered across ranks) do not depend
on the number of processes; only rank 0 logs to MLflow and writes the stage's outputs.

Resumable: a checkpoint (model, optimizer, scheduler, step, epoch, RNG states) is written every
`checkpoint_every` steps next to the output; `--resume` continues from it. The data order of an
epoch depends only on (seed, epoch), so a resumed run skips exactly the batches already seen.
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from g2d import tracking
from g2d.config import Params, dump_yaml, resolve_path, to_dict
from g2d.data import manifest as mf
from g2d.data.pairs import Collate, PairDataset, seed_worker
from g2d.errors import DataError
from g2d.pipeline import distributed, figures, model_files, preflight, runtime
from g2d.pipeline.pretrain import step as pretrain_step
from g2d.pipeline.pretrain.evaluation import embed_all, flat_quality, overall, pseudo_mask_quality, recall_at_k
from g2d.pipeline.pretrain.paths import CHECKPOINT, paths
from g2d.progress import Reporter, silent


@dataclass
class PretrainOutcome:
    model_dir: Path
    metrics: dict
    run_id: str
    version: int


def lr_lambda(warmup: int, total: int):
    """Linear warm-up to the peak at step `warmup` (capped to the run), then cosine decay to zero at
    the last step."""
    warmup = min(warmup, max(total - 1, 0))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(total - 1 - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return f


def model_card(params: Params, metrics: dict, data_hash: str, split_hash: str) -> str:
    """The card inside the model folder: a function of the stage's inputs only (no run id, no time), so a
    rerun that trains the same weights writes the same folder and DVC sees nothing new downstream."""
    m, p = params.model, params.pretrain
    retrieval = ", ".join(f"{k} {v:.3f}" for k, v in metrics.get("retrieval", {}).items())
    q = metrics.get("pseudo_mask", {})
    nan = float("nan")
    return f"""# {p.register_as}

G2D pre-trained chest X-ray encoder (Liu et al., NeurIPS 2024): a {m.encoder} U-Net image tower with its
decoder, a `{m.text_model}` text tower, projections to d = {m.embed_dim} and a {m.heads}-head attention pooling.

## Training
- data: `{params.pretrain.dataset or params.paths.synthcxr + '/pretrain'}`, sha256 `{data_hash}`;
  train ids sha256 `{split_hash}`
- dense pretext: `{p.dense}`; pseudo mask: threshold {p.pseudo_mask.threshold}, heads aggregated
  {p.pseudo_mask.aggregate_heads}, body mask {p.pseudo_mask.body_mask}, smoothing {p.pseudo_mask.smooth}
- {metrics['steps']} steps, batch {p.batch_size}, {p.image_size} px, AdamW lr {p.lr}, seed {params.seed}
- the MLflow run: the registered version's `run_id`

## Metrics (val split)
- zero-shot retrieval: {retrieval}
- pseudo masks on the rendered findings (chance: a random mask of the same area in the body, a random
  point of the body): coverage {q.get('coverage', nan):.3f} (chance {q.get('coverage_chance', nan):.3f}),
  IoU {q.get('iou', nan):.3f} ({q.get('iou_chance', nan):.3f}), pointing game {q.get('pointing', nan):.3f}
  ({q.get('pointing_chance', nan):.3f})

## Intended use and limits
For research: initialise segmentation, detection and classification models of chest radiographs and
measure label efficiency. Trained on SynthCXR (rendered images paired with real IU reports) unless the
data hash says otherwise: its features reflect synthetic anatomy and must not be used for diagnosis.
Files: `model.safetensors` (weights only, no code), `config.yaml` (rebuilds the network).
"""


def run(params: Params, resume: bool = False, reporter: Reporter = silent) -> PretrainOutcome | None:
    """Train, evaluate, export and register. Under torchrun every rank trains its share of each batch
    and only rank 0 logs, writes and returns the outcome (the others return None)."""
    ctx = distributed.from_environment()
    try:
        return _run(params, ctx, resume, reporter)
    finally:
        distributed.shutdown(ctx)


def _run(params: Params, ctx: distributed.Context, resume: bool, reporter: Reporter) -> PretrainOutcome | None:
    from torch.utils.data.distributed import DistributedSampler

    from g2d.model.g2d import G2D
    from g2d.model.towers import load_tokenizer

    cfg, p, compute = params.model, params.pretrain, params.compute
    data_dir, out, ckpt_dir, metrics_path = paths(params)
    info = mf.read_info(data_dir)
    if not info:
        raise DataError(f"{data_dir}: no dataset.json; render the data first (`g2d data synth` or `dvc repro synth`)")
    checked = preflight.check(params, [data_dir], [out, ckpt_dir, metrics_path.parent],
                              reporter if ctx.main else silent, tracked=ctx.main)
    per_rank = ctx.shard(p.batch_size, "pretrain.batch_size")
    runtime.seed_everything(params.seed)
    dev = distributed.device(ctx)
    precision = runtime.precision(compute.precision, dev)

    tokenizer = load_tokenizer(cfg)
    collate = Collate(tokenizer, cfg.max_length)
    packed = _pack(params, data_dir, info, ctx, reporter) if p.pack else None
    train = PairDataset(data_dir, "train", p.image_size, augment=p.augment, seed=params.seed, packed=packed)
    val = PairDataset(data_dir, "val", p.image_size, with_masks=True, packed=packed)
    split_hash = hashlib.sha256("\n".join(sorted(train.rows["id"])).encode()).hexdigest()
    if len(train) < p.batch_size:
        raise DataError(f"{data_dir}: {len(train)} training pairs, fewer than pretrain.batch_size = {p.batch_size}")
    steps_per_epoch = len(train) // p.batch_size  # drop_last: every step has a full set of negatives
    total = p.epochs * steps_per_epoch if p.max_steps is None else min(p.max_steps, p.epochs * steps_per_epoch)
    # the global batch of step i is the same whatever the world size: rank r takes every world-th index
    # of the epoch's permutation (DistributedSampler), i.e. 1/world of positions [i * batch, (i + 1) * batch)
    sampler = DistributedSampler(train, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=params.seed,
                                 drop_last=True)

    model = G2D(cfg, tokenizer.vocab_size, p.image_size).to(dev, memory_format=pretrain_step.layout(compute))
    model.text.length_groups = compute.text_length_groups
    if compute.grad_checkpointing:
        model.checkpoint_towers()
    step, history = 0, {"pseudo_mask": [], "loss": []}
    ckpt_path = ckpt_dir / CHECKPOINT
    # what a checkpoint must agree on to be resumed: the networks, the training recipe, the data
    identity = {**{f"model.{k}": v for k, v in to_dict(cfg).items()},
                **{f"pretrain.{k}": v for k, v in to_dict(p).items()},
                **{f"compute.{k}": v for k, v in to_dict(compute).items()},
                "seed": params.seed, "data_hash": info.get("sha256"), "split_hash": split_hash}
    state = _resumable(ckpt_path, identity) if resume else None
    if state is not None:
        model.load_state_dict(state["model"])
    # batch norm over the global batch, then DDP; the optimizer is built on the wrapped model's parameters
    net = distributed.wrap(model, ctx, dev, find_unused=p.dense == "none" or p.dense_warmup_steps > 0)
    if ctx.active:
        runtime.seed_everything(params.seed + ctx.rank)  # dropout noise of its own on every rank
    trainer = pretrain_step.Trainer.build(model, net, p, compute, dev, lr_lambda(p.warmup_steps, total))
    optimizer, scheduler, scaler = trainer.optimizer, trainer.scheduler, trainer.scaler
    if state is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if "scaler" in state:
                scaler.load_state_dict(state["scaler"])
            step, history = int(state["step"]), json.loads(state["history"])
            rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
            runtime.set_rng_state(rngs[ctx.rank % len(rngs)])
        except (KeyError, RuntimeError, ValueError) as e:
            raise runtime.CheckpointError(f"{ckpt_path}: incomplete or mismatched checkpoint ({e})") from None

    def checkpoint() -> None:
        """Every rank's RNG state goes in (a collective: all ranks call it at the same step)."""
        rngs = distributed.gather(ctx, runtime.rng_state())
        if ctx.main:
            runtime.save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "step": step, "epoch": step // steps_per_epoch, "rng": rngs,
                "history": json.dumps(history), "identity": json.dumps(identity), "run_id": tr.run_id})

    tags = {"g2d.split_hash": split_hash, "g2d.seed": str(params.seed), "g2d.resumed_from_step": str(step),
            "g2d.world_size": str(ctx.world), "g2d.precision": precision, **mf.protocol_tags(info.get("protocol"))}
    tracked = (tracking.start_run("pretrain", config=to_dict(params), data_hash=info.get("sha256"), tags=tags,
                                  uri=params.tracking.uri, system_metrics=True) if ctx.main else tracking.untracked())
    with tracked as tr:
        tr.log_text(checked.text(), preflight.ARTIFACT)
        interrupted = state.get("run_id") if state is not None else None
        if ctx.main and interrupted:  # the run this one continues, left RUNNING if its process was killed
            tracking.close_interrupted(interrupted, uri=params.tracking.uri)
            tr.set_tag("g2d.resumes_run", interrupted)
        tr.log_dataset("synthcxr-pretrain", source=str(data_dir / mf.MANIFEST), digest=info.get("sha256", ""),
                       context="training", profile={"train": len(train), "val": len(val)})
        eval_rows = list(range(min(p.eval_images, len(val))))
        eval_loader = DataLoader(torch.utils.data.Subset(val, eval_rows), batch_size=p.batch_size, collate_fn=collate)
        grid_batch = collate([val[i] for i in _grid_rows(val, p.grid_images)]) if ctx.main else None
        advance = reporter.task("pre-train G2D", total) if ctx.main else (lambda n: None)
        advance(step)
        started, seen, final_quality = time.perf_counter(), 0, None
        grid_dir = out.parent / f"{p.name}-figures"
        with runtime.StopRequests() as stop:
            while step < total:
                epoch = step // steps_per_epoch
                train.set_epoch(epoch)
                sampler.set_epoch(epoch)
                order = list(sampler)
                done_in_epoch = step - epoch * steps_per_epoch
                batches = [order[i * per_rank:(i + 1) * per_rank] for i in range(steps_per_epoch)]
                loader = DataLoader(train, batch_sampler=batches[done_in_epoch:], collate_fn=collate,
                                    num_workers=p.num_workers, worker_init_fn=seed_worker,
                                    persistent_workers=False, pin_memory=dev.type == "cuda",
                                    # its own generator: a loader must not draw from the global RNG, or a
                                    # resumed run's dropout would differ from an uninterrupted one's
                                    generator=torch.Generator().manual_seed(params.seed * 1000 + epoch))
                net.train()
                for batch in loader:
                    losses = trainer.losses(batch, p, dense_on=step >= p.dense_warmup_steps)
                    # each rank's loss is over its share of the batch: the logged loss is the global batch's
                    values = distributed.mean(ctx, {k: float(v.detach()) for k, v in (
                        ("total", losses.total), ("global", losses.global_), ("dense", losses.dense))}
                                              | {"stop": float(stop.signum is not None)})  # > 0: a rank was asked
                    stopping = values.pop("stop") > 0  # the same on every rank, so all stop at this step
                    if not math.isfinite(values["total"]):  # before the weights take it in
                        _non_finite(values["total"], step + 1, distributed.gather(ctx, list(batch["id"])), ckpt_dir,
                                    ctx, model, optimizer, batch)
                    lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
                    trainer.update(losses.total, p.grad_clip)
                    step += 1
                    seen += len(batch["id"]) * ctx.world
                    advance(1)
                    if step % p.log_every == 0 or step == total:
                        rate = seen / max(time.perf_counter() - started, 1e-9)
                        history["loss"].append([step, values["total"]])
                        tr.log_metrics({**{f"loss/{k}": v for k, v in values.items()}, "lr": lr, "pairs_per_s": rate},
                                       step=step)
                    if ctx.main and (step % p.grid_every == 0 or step == total):
                        path = _grid(model, grid_batch, p, dev, step, grid_dir / f"attention_step{step:06d}.png")
                        tr.log_artifact(path, "figures")
                    if ctx.main and (step % steps_per_epoch == 0 or step == total):
                        model.eval()
                        quality = pseudo_mask_quality(model, eval_loader, p.pseudo_mask, dev)
                        model.train()
                        history["pseudo_mask"].append({"step": step, "epoch": round(step / steps_per_epoch, 3),
                                                       **overall(quality)})
                        tr.log_metrics(flat_quality(quality), step=step)
                        final_quality = quality if step == total else None  # the final weights': _finish's
                    if (step % p.checkpoint_every == 0 and step < total) or stopping:  # after the epoch's evaluation
                        checkpoint()
                    if stopping:
                        stop.handled = True
                        signum = stop.signum or signal.SIGTERM
                        raise runtime.Stopped(signum, f"stopped by {signal.Signals(signum).name} after step {step} of "
                                              f"{total}; checkpoint {ckpt_path}; continue with `g2d pretrain --resume`")
                    if step >= total:
                        break
            checkpoint()
        if not ctx.main:
            distributed.barrier(ctx)  # rank 0 evaluates, exports and registers
            return None
        outcome = _finish(params, model, val, collate, eval_loader, final_quality, info, split_hash, history, step,
                          steps_per_epoch, len(train), dev, tr, out, metrics_path)
    distributed.barrier(ctx)
    return outcome


def _non_finite(value: float, step: int, ids: list[list[str]], ckpt_dir: Path, ctx, model, optimizer,
                batch: dict) -> None:
    """Stop on a NaN / inf loss, after writing what it takes to reproduce it: the weights and optimizer before
    this step, and the batch (rank 0's share, and every rank's image ids)."""
    ids = [i for rank in ids for i in rank]
    path = ckpt_dir / f"nonfinite-step{step:06d}.pt"
    if ctx.main:
        runtime.save_checkpoint(path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "ids": ids,
            "batch": {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}})
    raise runtime.NonFiniteLoss(
        f"pre-training loss is {value} at step {step}; the batch's images: {', '.join(ids)}; debug checkpoint "
        f"(weights before the step, the batch) {path}; lower pretrain.lr or check these images "
        "(`g2d data validate`)")


def _pack(params: Params, data_dir: Path, info: dict, ctx, reporter: Reporter) -> Path:
    """The dataset's images resized to the training size in one file (g2d/data/packed.py), named after the
    dataset's hash and the size, so a stale pack is never found; rank 0 builds it, the others wait."""
    from g2d.data.packed import PackedImages, pack

    size = params.pretrain.image_size
    name = f"{(info.get('sha256') or 'unhashed')[:16]}-{size}.npy"
    path = resolve_path(tracking.project_root(), params.paths.packs) / name
    with distributed.main_first(ctx):
        if ctx.main:
            images = list(mf.read_manifest(data_dir)["image"])  # manifest order: the order PairDataset reads
            try:
                PackedImages.open(path, data_dir, images, size)
            except DataError:  # absent or stale: (re)build it
                pack(data_dir, images, size, path, reporter.task(f"pack images at {size} px", len(images)), workers=0)
    return path


def _resumable(ckpt_path: Path, identity: dict) -> dict:
    """The checkpoint, if it was written by this run (same networks, recipe and data)."""
    state = runtime.load_checkpoint(ckpt_path)
    saved = json.loads(state.get("identity", "{}")) if isinstance(state.get("identity"), str) else {}
    differ = [f"{k} {saved.get(k)!r} != {v!r}" for k, v in identity.items() if saved.get(k) != v]
    if differ:
        raise runtime.CheckpointError(f"{ckpt_path}: written by a different run ({'; '.join(differ[:4])}); "
                                      "resume with the same params and data, or start without --resume")
    if "model" not in state:
        raise runtime.CheckpointError(f"{ckpt_path}: incomplete or mismatched checkpoint (no model weights)")
    return state


def _finish(params: Params, model, val: PairDataset, collate, eval_loader, quality: dict | None, info: dict,
            split_hash: str, history: dict, step: int, steps_per_epoch: int, n_train: int, dev, tr, out: Path,
            metrics_path: Path) -> PretrainOutcome:
    """Rank 0 after training: val retrieval and pseudo-mask quality, metrics, the model folder, the registry."""
    p = params.pretrain
    model.eval()
    val_loader = DataLoader(val, batch_size=p.batch_size, collate_fn=collate)
    image_emb, text_emb = embed_all(model, val_loader, dev)
    retrieval = recall_at_k(image_emb @ text_emb.T)
    if quality is None:  # a run resumed after its last step: not evaluated in this process
        quality = pseudo_mask_quality(model, eval_loader, p.pseudo_mask, dev)
    n_val = len(val)
    metrics = {
        "steps": step, "epochs": round(step / steps_per_epoch, 3), "train_pairs": n_train, "val_pairs": n_val,
        "final_loss": history["loss"][-1][1] if history["loss"] else None,
        "retrieval": retrieval, "retrieval_chance": {f"R@{k}": round(k / n_val, 5) for k in (1, 5, 10)},
        "pseudo_mask": quality,  # the final weights': overall, by finding kind, each with its chance value
        "pseudo_mask_by_epoch": history["pseudo_mask"],  # overall, at the end of every epoch
        "data_hash": info.get("sha256"), "split_hash": split_hash,
    }
    if history["pseudo_mask"]:
        curve = figures.pseudo_mask_curve(history["pseudo_mask"], f"{p.name} ({p.dense}): pseudo masks on val findings",
                                          out.parent / f"{p.name}-figures" / "pseudo_mask_by_epoch.png")
        tr.log_artifact(curve, "figures")
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    tr.log_artifact(metrics_path)

    card = model_card(params, metrics, info.get("sha256", ""), split_hash)
    model_files.save(model, p.image_size, out, card, extra={"kind": model_files.ENCODER_KIND,
                                                             "dense": p.dense, "data_hash": info.get("sha256"),
                                                             "split_hash": split_hash})
    dump_yaml(params, out / "params.yaml", ("seed", "model", "pretrain"))
    version = tracking.register_model_dir(tr, out, p.register_as, step=step,
                                          metrics={f"val/{k}": v for k, v in retrieval.items()})
    return PretrainOutcome(out, metrics, tr.run_id, version)


def _grid_rows(val: PairDataset, n: int) -> list[int]:
    """Val rows with rendered findings first, so the grid shows where the model should look."""
    with_findings = [i for i, f in enumerate(val.rows.get("findings", [])) if f and f != "[]"]
    chosen = set(with_findings)
    rest = [i for i in range(len(val)) if i not in chosen]
    return (with_findings + rest)[:n]


@torch.no_grad()
def _grid(model, batch: dict, p, dev, step: int, path: Path) -> Path:
    from g2d.model.pseudo_mask import pseudo_mask

    was_training = model.training
    model.eval()
    images = batch["image"].to(dev)
    image = model.encode_image(images)
    masks = pseudo_mask(image.attention, images, p.pseudo_mask.model_copy(update={"shuffle": False}))
    model.train(was_training)
    return figures.attention_grid(images, image.attention, masks, batch.get("mask"), batch["id"],
                                  f"step {step}: attention, pseudo mask, rendered findings", path)
