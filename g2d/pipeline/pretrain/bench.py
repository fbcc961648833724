"""`g2d bench`: what this implementation's training step costs, measured in one run on one machine.

Three ways of training the same G2D network on the same pre-training pairs, timed in interleaved
rounds (so drifting machine load hits all of them alike):

- `g2d`:     this implementation (the `pretrain` stage's step: `pretrain_step.Trainer`): reports padded
             to the longest of their length group (`compute.text_length_groups`), frozen text layers
             recorded by no autograd graph, channels_last, precision from `compute` (bf16 on CUDA, fp32
             on CPU);
- `global`:  the same without the dense task (dense = none): what the pseudo segmentation costs;
- `authors`: the training the authors' released code does: every report padded to 256 tokens, frozen
             layers still tracked by autograd (their activations kept, the backward pass runs through
             them), contiguous NCHW tensors, fp16 autocast with a GradScaler on CUDA. On a CPU both
             `g2d` and `authors` run in fp32 (fp16 autocast is not a CPU training mode); the authors'
             GradScaler still runs (scaling, unscaling and the inf check are part of their step).

It prints pairs/s of each, the ratios (g2d / authors, G2D step / global step), the dataloader's
images/s against what the model consumes, peak memory and FLOPs per pair (and on a GPU the model FLOPs
utilisation against the device's peak).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader

from g2d.config import Compute, Model, Params
from g2d.errors import DataError
from g2d.pipeline import runtime
from g2d.pipeline.pretrain import step as pretrain_step
from g2d.progress import Reporter, silent

# The paper's networks (§4), as params.paper.yaml has them: ResNet-50 U-Net (decoder widths 128..8: the paper
# does not give them), a BERT-base text tower (Bio_ClinicalBERT's shape, built from config with random weights:
# timing does not depend on the weights, and nothing is downloaded), 9 of 12 layers frozen, reports up to 256
# tokens, d = 128.
PAPER_MODEL = Model(encoder="resnet50", decoder_channels=(128, 64, 32, 16, 8), text_model="bert-base-config",
                    text_frozen_layers=9, max_length=256, embed_dim=128, heads=4)
AUTHORS_PAD = 256
# dense bf16 / fp16 tensor-core peaks (FLOP/s) for model FLOPs utilisation; others print TFLOP/s only
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


@dataclass
class Variant:
    name: str
    dense: str
    authors: bool = False
    seconds: list[float] = field(default_factory=list)  # per step, wall clock
    cpu_seconds: list[float] = field(default_factory=list)  # per step, this process's CPU time
    peak_bytes: int = 0  # CUDA: peak allocated; CPU: tensors saved for the backward pass
    flops: float = float("nan")  # per step, forward + backward

    def pairs_per_s(self, batch: int) -> float:
        return batch / statistics.median(self.seconds)


@dataclass
class BenchResult:
    device: str
    kind: str  # cuda | cpu
    batch: int
    image_size: int
    variants: dict[str, Variant]
    loader_images_per_s: float
    loader_workers: int
    mean_tokens: float  # per report of the measured batches, after dynamic padding
    peak_flops: float | None

    def ratios(self) -> dict[str, float]:
        v = {k: x.pairs_per_s(self.batch) for k, x in self.variants.items()}
        cpu = {k: statistics.median(x.cpu_seconds) for k, x in self.variants.items()}
        return {"g2d_vs_authors": v["g2d"] / v["authors"],
                "g2d_step_vs_global_step": statistics.median(self.variants["g2d"].seconds)
                / statistics.median(self.variants["global"].seconds),
                # the same two from CPU time: robust to other processes sharing the machine
                "g2d_vs_authors_cpu_time": cpu["authors"] / cpu["g2d"],
                "g2d_step_vs_global_step_cpu_time": cpu["g2d"] / cpu["global"],
                "loader_vs_model": self.loader_images_per_s / v["g2d"]}

    def as_dict(self) -> dict:
        return {"device": self.device, "batch": self.batch, "image_size": self.image_size,
                "mean_padded_tokens": self.mean_tokens, "loader_images_per_s": self.loader_images_per_s,
                "loader_workers": self.loader_workers, "ratios": self.ratios(),
                "variants": {k: {"pairs_per_s": v.pairs_per_s(self.batch),
                                 "step_s_median": statistics.median(v.seconds),
                                 "step_cpu_s_median": statistics.median(v.cpu_seconds),
                                 "steps_timed": len(v.seconds), "peak_memory_mb": v.peak_bytes / 2**20,
                                 "gflops_per_pair": v.flops / self.batch / 1e9,
                                 **({"mfu": v.flops / statistics.median(v.seconds) / self.peak_flops}
                                    if self.peak_flops else {})}
                             for k, v in self.variants.items()}}


def run(params: Params, *, batch: int, steps: int, rounds: int, image_size: int, workers: int,
        loader_batches: int, paper_model: bool = True, count_flops: bool = True,
        reporter: Reporter = silent) -> BenchResult:
    from g2d.data.pairs import Collate, PairDataset
    from g2d.model.towers import load_tokenizer
    from g2d.pipeline.pretrain.paths import paths

    cfg = PAPER_MODEL if paper_model else params.model
    data_dir = paths(params)[0]
    if not (data_dir / "manifest.csv").is_file():
        raise DataError(f"{data_dir}: no pre-training pairs to benchmark on; render them first (`dvc repro synth` "
                        "or `g2d data synth`) or set pretrain.dataset")
    runtime.seed_everything(params.seed)
    dev = runtime.device()
    tokenizer = load_tokenizer(cfg)
    train = PairDataset(data_dir, "train", image_size, augment=True, seed=params.seed)
    if len(train) < batch:
        raise DataError(f"{data_dir}: {len(train)} training pairs, fewer than the benchmark batch {batch}")
    # a few real batches, collated both ways, reused for every step (the loader is timed on its own)
    rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(params.seed)).tolist()
    n_batches = max(1, min(4, len(train) // batch))
    items = [[train[i] for i in rows[b * batch:(b + 1) * batch]] for b in range(n_batches)]
    ours = [Collate(tokenizer, cfg.max_length)(it) for it in items]
    authors = []
    for it, mine in zip(items, ours, strict=True):
        padded = tokenizer([x["report"] for x in it], padding="max_length", truncation=True,
                           max_length=max(AUTHORS_PAD, cfg.max_length), return_tensors="pt")
        authors.append({**mine, "input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]})
    mean_tokens = float(statistics.mean(b["input_ids"].shape[1] for b in ours))

    variants = {"g2d": Variant("g2d", "pseudo_seg"), "global": Variant("global", "none"),
                "authors": Variant("authors", "pseudo_seg", authors=True)}
    trainers = {k: _trainer(v, cfg, params, image_size, batch, tokenizer.vocab_size, dev) for k, v in variants.items()}
    batches = {"g2d": ours, "global": ours, "authors": authors}
    recipe = {k: params.pretrain.model_copy(update={"dense": v.dense, "batch_size": batch, "image_size": image_size})
              for k, v in variants.items()}

    advance = reporter.task("benchmark steps", len(variants) * (1 + steps * rounds + int(count_flops)))
    for k, trainer in trainers.items():  # warm-up: allocations, kernel selection
        saved = _step(trainer, batches[k][0], recipe[k])
        if dev.type == "cpu":
            variants[k].peak_bytes = saved
        advance(1)
        if count_flops:
            variants[k].flops = _flops(trainer, batches[k][0], recipe[k])
            advance(1)
    for r in range(rounds):
        for k, trainer in trainers.items():
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            for s in range(steps):
                started, cpu = time.perf_counter(), time.process_time()
                _step(trainer, batches[k][(r * steps + s) % n_batches], recipe[k])
                variants[k].seconds.append(time.perf_counter() - started)
                variants[k].cpu_seconds.append(time.process_time() - cpu)
                advance(1)
            if dev.type == "cuda":
                variants[k].peak_bytes = max(variants[k].peak_bytes, torch.cuda.max_memory_allocated(dev))

    loader = DataLoader(train, batch_size=batch, shuffle=True, collate_fn=Collate(tokenizer, cfg.max_length),
                        num_workers=workers, drop_last=True, generator=torch.Generator().manual_seed(params.seed),
                        persistent_workers=False)
    images_per_s = _loader_rate(loader, loader_batches, batch)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = next((f for key, f in PEAK_FLOPS.items() if key in name), None) if dev.type == "cuda" else None
    return BenchResult(f"{name} ({torch.get_num_threads()} threads)" if dev.type == "cpu" else name, dev.type, batch,
                       image_size, variants, images_per_s, workers, mean_tokens, peak)


def _trainer(v: Variant, cfg: Model, params: Params, image_size: int, batch: int, vocab: int,
             dev: torch.device) -> pretrain_step.Trainer:
    from g2d.model.g2d import G2D

    torch.manual_seed(params.seed)  # the same initial weights for every variant
    compute = (Compute(precision="fp16" if dev.type == "cuda" else "fp32", channels_last=False) if v.authors
               else params.compute)  # as configured: a compiled step compiles in the warm-up step
    model = G2D(cfg, vocab, image_size).to(dev, memory_format=pretrain_step.layout(compute))
    model.text.track_frozen = v.authors
    model.text.length_groups = 1 if v.authors else compute.text_length_groups
    if params.compute.grad_checkpointing and not v.authors:
        model.checkpoint_towers()
    recipe = params.pretrain.model_copy(update={"batch_size": batch})
    trainer = pretrain_step.Trainer.build(model, model, recipe, compute, dev, lambda step: 1.0)
    if v.authors:
        trainer.scaler = torch.amp.GradScaler(dev.type, enabled=True)
    model.train()
    return trainer


def _step(trainer: pretrain_step.Trainer, batch: dict, recipe) -> int:
    """One training step; returns the bytes of the tensors autograd saved for its backward pass (the
    activation memory, which is where the variants differ: a CPU has no allocator statistics to ask)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses = trainer.losses(batch, recipe, dense_on=True)
    trainer.update(losses.total, recipe.grad_clip)
    if trainer.dev.type == "cuda":
        torch.cuda.synchronize(trainer.dev)
    return sum(storages.values())


def _flops(trainer: pretrain_step.Trainer, batch: dict, recipe) -> float:
    """FLOPs of one step's forward and backward passes (torch's counter: matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        losses = trainer.losses(batch, recipe, dense_on=True)
        trainer.scaler.scale(losses.total).backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def _loader_rate(loader: DataLoader, n: int, batch: int) -> float:
    """Images/s the dataloader delivers (decode, augment, tokenise), timed after its first batch
    (worker start-up excluded)."""
    it = iter(loader)
    next(it)
    started, got = time.perf_counter(), 0
    for _ in range(n):
        try:
            next(it)
        except StopIteration:
            break
        got += batch
    return got / max(time.perf_counter() - started, 1e-9)


def table(result: BenchResult) -> str:
    """The printed report."""
    d = result.as_dict()
    lines = [f"device {d['device']}; batch {d['batch']} pairs of {d['image_size']} px; reports padded to "
             f"{d['mean_padded_tokens']:.0f} tokens on average (authors: {AUTHORS_PAD})",
             f"{'variant':<9} {'pairs/s':>8} {'step s':>7} {'CPU s':>7} {'GFLOP/pair':>10} {'peak MB':>8}"
             + ("  MFU" if result.peak_flops else "")]
    for k, v in d["variants"].items():
        lines.append(f"{k:<9} {v['pairs_per_s']:8.2f} {v['step_s_median']:7.2f} {v['step_cpu_s_median']:7.2f} "
                     f"{v['gflops_per_pair']:10.1f} {v['peak_memory_mb']:8.0f}"
                     + (f"  {v['mfu']:.1%}" if "mfu" in v else ""))
    r = d["ratios"]
    lines += [f"(a) g2d vs authors' training: {r['g2d_vs_authors']:.2f}x pairs/s "
              f"({r['g2d_vs_authors_cpu_time']:.2f}x by CPU time)",
              f"(b) G2D step vs global-only step: {r['g2d_step_vs_global_step']:.2f}x time "
              f"({r['g2d_step_vs_global_step_cpu_time']:.2f}x by CPU time; the dense task's cost)",
              f"(c) dataloader: {d['loader_images_per_s']:.1f} images/s with {d['loader_workers']} workers, "
              f"{r['loader_vs_model']:.1f}x what the model consumes",
              "(d) peak memory, column 'peak MB': " + ("allocated on the GPU (weights, optimizer, activations)"
                                                     if result.kind == "cuda" else
                                                     "tensors saved for the backward pass (activations)")]
    return "\n".join(lines)
