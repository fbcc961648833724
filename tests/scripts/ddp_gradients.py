"""Run under torchrun by tests/test_distributed.py: the gradient of one G2D step computed by N ranks
(DDP, global batch norm, InfoNCE negatives gathered across ranks) against the gradient of one process
holding the whole global batch. Prints one line per rank: rank, the losses, the worst relative error."""

from __future__ import annotations

import copy
import sys

import torch

import g2d.model.losses as losses
from g2d.config import Model, Pretrain
from g2d.model.g2d import G2D
from g2d.model.towers import load_tokenizer
from g2d.pipeline import distributed


def main(dense: str) -> None:
    ctx = distributed.from_environment()
    torch.manual_seed(0)
    cfg = Model(text_model="tiny", encoder="resnet18", decoder_channels=(16, 8, 8, 4, 4), text_frozen_layers=1,
                embed_dim=16, heads=2, text_dropout=0.0)
    tokenizer = load_tokenizer(cfg)
    model = G2D(cfg, tokenizer.vocab_size, 64)
    reference = copy.deepcopy(model).train()
    recipe = Pretrain(image_size=64, batch_size=8, dense=dense)
    images = torch.rand(8, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    reports = [f"report {i}:" + " the lungs are clear" * (i + 1) for i in range(8)]

    gather = losses.gather_with_grad
    losses.gather_with_grad = lambda x: x  # the reference sees the whole batch in one process
    tokens = tokenizer(reports, padding="longest", return_tensors="pt")
    whole = reference(images, tokens["input_ids"], tokens["attention_mask"], recipe, dense_on=True)
    whole.total.backward()
    losses.gather_with_grad = gather

    net = distributed.wrap(model, ctx, torch.device("cpu"), find_unused=True).train()
    mine = list(range(ctx.rank, 8, ctx.world))  # the order DistributedSampler deals a global batch in
    tokens = tokenizer([reports[i] for i in mine], padding="longest", return_tensors="pt")
    shard = net(images[mine], tokens["input_ids"], tokens["attention_mask"], recipe, dense_on=True)
    shard.total.backward()
    global_, dense_ = (float(v) for v in (shard.global_.detach(), shard.dense.detach()))
    dense_ = distributed.mean(ctx, {"d": dense_})["d"]

    largest = max(float(p.grad.abs().max()) for p in reference.parameters() if p.grad is not None)
    worst = 0.0
    for (name, a), (_, b) in zip(reference.named_parameters(), model.named_parameters(), strict=True):
        if a.grad is None or b.grad is None:
            assert (a.grad is None) == (b.grad is None) or float(a.grad.abs().max()) == 0, name
            continue
        scale = float(a.grad.abs().max())
        if scale < 1e-4 * largest:  # gradients that are zero in exact arithmetic (a bias before batch norm)
            continue
        worst = max(worst, float((a.grad - b.grad).abs().max()) / scale)
    print(f"rank {ctx.rank} global {float(whole.global_):.6f} {global_:.6f} dense {float(whole.dense):.6f} "
          f"{dense_:.6f} worst {worst:.3e}", flush=True)
    distributed.shutdown(ctx)


if __name__ == "__main__":
    main(sys.argv[1])
