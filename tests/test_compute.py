"""The `compute` settings change how a step runs, never what it computes (beyond rounding): gradient
checkpointing, channels_last and precision. CUDA-only checks (bf16 / fp16 autocast, torch.compile on the
GPU) are skipped without a GPU; benchmarks/gpu_check.sh runs them on one."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from g2d.config import Compute, Model, Pretrain
from g2d.model.g2d import G2D
from g2d.model.towers import load_tokenizer
from g2d.pipeline import runtime
from g2d.pipeline.pretrain import step as pretrain_step

TINY = Model(text_model="tiny", encoder="resnet18", decoder_channels=(16, 8, 8, 4, 4), text_frozen_layers=1,
             max_length=16, embed_dim=16, heads=2, text_dropout=0.0)
SIZE = 64
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)")


@pytest.fixture(autouse=True)
def fp32_means_fp32():
    """The fp32 references are fp32 on GPUs too: cuDNN runs fp32 convolutions in TF32 (10-bit mantissa) unless
    told not to, which alone moves a first-layer gradient of the tiny net by ~8% between two algorithms."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


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
    if trainer.scaler.is_enabled():  # fp16: GradScaler's first scale (2^16) overflows here, and training skips
        trainer.scaler = torch.amp.GradScaler(dev.type, init_scale=2.0**8)  # such steps; compare a kept one
    losses = trainer.losses(batch, Pretrain(image_size=SIZE, batch_size=4, dense="reconstruction"), dense_on=True)
    trainer.scaler.scale(losses.total).backward()
    scale = trainer.scaler.get_scale() if trainer.scaler.is_enabled() else 1.0
    return float(losses.total.detach()), {k: p.grad.float().cpu() / scale for k, p in model.named_parameters()
                                 if p.grad is not None}


def _close(a: dict, b: dict, rel: float) -> None:
    assert a.keys() == b.keys()
    largest = max(float(g.abs().max()) for g in a.values())
    for k in a:
        # relative to the tensor's own scale, plus a floor at 1% of the largest gradient: a small gradient that is a
        # sum of much larger terms (the tiny decoder's) keeps their rounding, which depends on the kernel and on the
        # number of threads (measured: 0.7% of a decoder weight's gradient at one OpenMP thread, 0.01% at two)
        scale = float(a[k].abs().max())
        assert float((a[k] - b[k]).abs().max()) <= rel * (scale + 1e-2 * largest), k


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
    # a random ResNet in train mode on 4 images of 64 px amplifies rounding layer by layer (BatchNorm over 16
    # values a channel at C5): bf16's 8-bit mantissa ends 5% off at C5 and moves the loss ~6%, on this GPU and
    # on a CPU with bf16 instructions alike (measured); fp16's 11 bits stay within 2%
    loss_rel, min_cos = {"bf16": (0.1, 0.85), "fp16": (2e-2, 0.99)}[precision]
    assert loss_mixed == pytest.approx(loss_32, rel=loss_rel)
    cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in grads_32.values()]),
                                                torch.cat([grads_mixed[k].flatten() for k in grads_32]), dim=0)
    assert cos > min_cos


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


def _labelled(kind: str, split: str, n: int, seed: int):
    """A tiny split of random images whose labels follow a bright square, so a head has something to learn."""
    from g2d.data.labelled import LabelledSplit

    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, SIZE, SIZE, generator=g) * 0.5
    masks = torch.zeros(n, 1, SIZE, SIZE, dtype=torch.bool)
    boxes, box_labels = [], []
    for i in range(n):
        if i % 2:
            x, y = torch.randint(4, SIZE - 24, (2,), generator=g).tolist()
            images[i, :, y:y + 16, x:x + 16] += 0.5
            masks[i, :, y:y + 16, x:x + 16] = True
            boxes.append(torch.tensor([[x, y, x + 16, y + 16]], dtype=torch.float32))
            box_labels.append(torch.ones(1, dtype=torch.long))
        else:
            boxes.append(torch.zeros(0, 4))
            box_labels.append(torch.zeros(0, dtype=torch.long))
    labels = masks.flatten(1).any(1).float()[:, None].repeat(1, 5)
    ids = [f"{split}{i}" for i in range(n)]
    if kind == "segmentation":
        return LabelledSplit(split, ids, images, masks=masks)
    if kind == "detection":
        return LabelledSplit(split, ids, images, boxes=boxes, box_labels=box_labels)
    return LabelledSplit(split, ids, images, labels=labels)


def _finetune_cell(task: str, dev: torch.device, precision: str, figure: Path) -> tuple[list, dict]:
    """One fine-tuning cell of `task` by the engine `g2d train` runs (cached frozen maps, the epoch loop, the test
    under the training precision, the figure of test predictions), on random tiny data, with no tracking: (its
    history, its test scores)."""
    from g2d.config import Finetune
    from g2d.data import tasks
    from g2d.model.towers import build_unet
    from g2d.pipeline.finetune import classification, detection, features, segmentation
    from g2d.pipeline.finetune import fit as loop

    spec = tasks.get(task)
    family = {"segmentation": segmentation, "detection": detection, "classification": classification}[spec.kind]
    recipe = {"epochs": 3, "batch_size": 4}
    ft = Finetune.model_validate({"image_size": SIZE, "segmentation": {**recipe, "augment": {"views": 1}},
                                  "detection": recipe, "probe": recipe})
    train, val, test = (_labelled(spec.kind, s, n, i).to(dev) for i, (s, n) in
                        enumerate([("train", 12), ("val", 8), ("test", 8)]))
    runtime.seed_everything(0)
    unet = build_unet(TINY)
    config = {"image_size": SIZE}
    net = family.wrap(unet, spec, ft, config).to(dev)
    views = family.views(train, ft, 0)
    inputs = features.inputs(net, unet.encoder, views, val, test, True, features.FeatureCache(1.0))
    setup = loop.Setup(dev=dev, precision=precision)
    result = family.fit(net, inputs, torch.arange(len(train)), spec, ft, 0, lambda n=1: None,
                        lambda *a, **k: None, setup)
    with runtime.autocast(dev, precision):
        scores = family.evaluate(net, test, spec, config, inputs.test_maps)
    assert family.figure(net, test, spec, config, 4, task, figure).stat().st_size > 0
    return result.history, scores


@pytest.mark.parametrize(("task", "dev"), [("chexpert-cls", "cpu"),  # the CPU's bf16: test_finetune.py, end to end
                                          *(pytest.param(t, "cuda", marks=cuda)
                                            for t in ("siim-seg", "rsna-det", "chexpert-cls"))])
def test_finetune_cell_in_bf16_follows_fp32(task, dev, tmp_path):
    """`compute.precision: auto` is bf16 on GPUs (and on CPUs with bf16 instructions): every fine-tuning family
    trains and tests there, its first epoch's losses follow fp32's, and what it scores is a real fp32 number."""
    from g2d.data import tasks

    dev = torch.device(dev)
    history_32, scores_32 = _finetune_cell(task, dev, "fp32", tmp_path / "fp32.png")
    history_16, scores_16 = _finetune_cell(task, dev, "bf16", tmp_path / "bf16.png")
    assert len(history_16) == len(history_32) == 3
    for a, b in zip(history_32[0][2:4], history_16[0][2:4], strict=True):  # epoch 1: train loss, val loss
        assert b == pytest.approx(a, rel=5e-2)
    metric = tasks.get(task).metric
    for scores in (scores_32, scores_16):
        assert isinstance(scores[metric], float) and 0 <= scores[metric] <= 1


@pytest.mark.parametrize("size", [32, 64])
def test_detector_p6_p7_gradients_in_bf16_are_fp32s(size):
    """At 64 px P7 (at 32 px P6 too) is a stride-2 3 x 3 conv on a 1 x 1 map: oneDNN's AMX bf16 weight gradient
    gave garbage there (NaN or up to 3e38 on the padding taps, 60 of 200 draws), so the block runs in fp32.
    Twenty draws would all agree by chance with probability (140/200)^20 < 1e-3."""
    import segmentation_models_pytorch as smp

    from g2d.model.transfer import build_detector

    for draw in range(20):
        torch.manual_seed(draw)
        encoder = smp.encoders.get_encoder("resnet18", in_channels=1, depth=5, weights=None)
        net = build_detector(encoder, 1, size, 16, True, 0.05, 5).train()
        maps = [torch.randn(2, c, size // s, size // s)
                for c, s in zip(encoder.out_channels[-3:], (8, 16, 32), strict=True)]
        grads = []
        for precision in ("fp32", "bf16"):
            net.zero_grad()
            with runtime.autocast(torch.device("cpu"), precision):
                sum(f.float().square().mean() for f in net.backbone.decode(maps).values()).backward()
            blocks = net.backbone.fpn.extra_blocks
            grads.append(torch.cat([p.grad.flatten() for p in (blocks.p6.weight, blocks.p7.weight)]))
        # bf16 rounding of the FPN's P5 moves them by <= 5% of the largest (measured: 0.2-4.9% over these draws)
        assert float((grads[1] - grads[0]).abs().max()) <= 0.1 * float(grads[0].abs().max()), draw
