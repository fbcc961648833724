"""The `compute` settings change how a step runs, never what it computes (beyond rounding): gradient
checkpointing, channels_last and precision. CUDA-only checks (bf16 / fp16 autocast, torch.compile on the
GPU) are skipped without a GPU; benchmarks/gpu_check.sh runs them on one."""

from __future__ import annotations

import copy

import pytest
import torch

from g2d.config import Compute, Model, Pretrain
from g2d.model.g2d import G2D
from g2d.model.towers import load_tokenizer
from g2d.pipeline import pretrain_step, runtime

TINY = Model(text_model="tiny", encoder="resnet18", decoder_channels=(16, 8, 8, 4, 4), text_frozen_layers=1,
             max_length=16, embed_dim=16, heads=2, text_dropout=0.0)
SIZE = 64
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY)


def _batch(tokenizer, n=4):
    reports = ["no acute findings", "small left effusion", "right upper lobe opacity", "enlarged heart"][:n]
    tokens = tokenizer(reports, padding="longest", return_tensors="pt")
    images = torch.rand(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    return {"image": images, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


CPU = torch.device("cpu")


def _grads(model: G2D, batch: dict, compute: Compute, dev: torch.device = CPU) -> tuple[float, dict]:
    model = model.to(dev, memory_format=pretrain_step.layout(compute)).train()
    trainer = pretrain_step.Trainer.build(model, model, Pretrain(image_size=SIZE, batch_size=4), compute, dev,
                                          lambda s: 1.0)
    losses = trainer.losses(batch, Pretrain(image_size=SIZE, batch_size=4, dense="reconstruction"), dense_on=True)
    trainer.scaler.scale(losses.total).backward()
    scale = trainer.scaler.get_scale() if trainer.scaler.is_enabled() else 1.0
    return float(losses.total.detach()), {k: p.grad.float().cpu() / scale for k, p in model.named_parameters()
                                 if p.grad is not None}


def _close(a: dict, b: dict, rel: float) -> None:
    assert a.keys() == b.keys()
    largest = max(float(g.abs().max()) for g in a.values())
    for k in a:
        scale = float(a[k].abs().max())
        if scale > 1e-4 * largest:  # gradients that are zero in exact arithmetic carry only rounding
            assert float((a[k] - b[k]).abs().max()) <= rel * scale, k


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer):
    torch.manual_seed(0)
    plain = G2D(TINY, tokenizer.vocab_size, SIZE)
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpoint_towers()
    batch = _batch(tokenizer)
    loss_a, grads_a = _grads(plain, batch, Compute(precision="fp32", channels_last=False))
    loss_b, grads_b = _grads(checkpointed, batch, Compute(precision="fp32", channels_last=False))
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    _close(grads_a, grads_b, 1e-5)
    # and it really recomputes: the encoder stages run twice per step (forward, then again in backward)
    calls = []
    checkpointed.unet.encoder.layer2[0].register_forward_hook(lambda *a: calls.append(1))
    _grads(checkpointed, batch, Compute(precision="fp32", channels_last=False))
    assert len(calls) == 2


def test_channels_last_gives_the_same_step(tokenizer):
    torch.manual_seed(0)
    model = G2D(TINY, tokenizer.vocab_size, SIZE)
    batch = _batch(tokenizer)
    loss_a, grads_a = _grads(copy.deepcopy(model), batch, Compute(precision="fp32", channels_last=False))
    loss_b, grads_b = _grads(copy.deepcopy(model), batch, Compute(precision="fp32", channels_last=True))
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    _close(grads_a, grads_b, 1e-3)


def test_precision_resolves_per_device(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert runtime.precision("auto", gpu) == "bf16"
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)  # bf16 emulated: slower than fp32
    assert runtime.precision("auto", cpu) == "fp32"
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)  # AVX512-BF16 / AMX
    assert runtime.precision("auto", cpu) == "bf16"
    assert runtime.precision("fp16", cpu) == "fp16"
    assert runtime.grad_scaler(cpu, "fp16").is_enabled() and not runtime.grad_scaler(cpu, "fp32").is_enabled()


@cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_step_on_cuda_follows_fp32(tokenizer, precision):
    torch.manual_seed(0)
    model = G2D(TINY, tokenizer.vocab_size, SIZE)
    batch = _batch(tokenizer)
    dev = torch.device("cuda")
    loss_32, grads_32 = _grads(copy.deepcopy(model), batch, Compute(precision="fp32"), dev)
    loss_mixed, grads_mixed = _grads(copy.deepcopy(model), batch, Compute(precision=precision), dev)
    assert loss_mixed == pytest.approx(loss_32, rel=2e-2)
    cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in grads_32.values()]),
                                                torch.cat([grads_mixed[k].flatten() for k in grads_32]), dim=0)
    assert cos > 0.99


@cuda
def test_compiled_step_on_cuda_matches_eager(tokenizer):
    torch.manual_seed(0)
    model = G2D(TINY, tokenizer.vocab_size, SIZE)
    batch = _batch(tokenizer)
    dev = torch.device("cuda")
    loss_eager, grads_eager = _grads(copy.deepcopy(model), batch, Compute(precision="fp32"), dev)
    loss_compiled, grads_compiled = _grads(copy.deepcopy(model), batch, Compute(precision="fp32", compile=True), dev)
    assert loss_compiled == pytest.approx(loss_eager, rel=1e-3)
    _close(grads_eager, grads_compiled, 1e-2)


def test_length_groups_leave_every_report_embedding_unchanged(tokenizer):
    """Running the reports in length-sorted groups, each padded to its own longest, changes no output."""
    from g2d.model.towers import TextTower

    torch.manual_seed(0)
    tower = TextTower(TINY, tokenizer.vocab_size).train()
    reports = ["no acute findings", "small left effusion with adjacent atelectasis at the left base",
               "enlarged heart", "right upper lobe opacity, possibly pneumonia; follow up advised", "normal", "a b c"]
    tokens = tokenizer(reports, padding="longest", return_tensors="pt")
    whole = tower(tokens["input_ids"], tokens["attention_mask"]).tokens
    tower.length_groups = 3
    grouped = tower(tokens["input_ids"], tokens["attention_mask"]).tokens
    keep = tokens["attention_mask"].bool()
    assert torch.allclose(whole[keep], grouped[keep], atol=1e-5)
    grouped[keep].sum().backward()  # gradients flow back through the regrouping
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.parameters())
