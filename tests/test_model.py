"""The G2D modules on tiny inputs: shapes, the pseudo mask's properties, the losses, the ablations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from g2d.config import Model, Pretrain, PseudoMask, validate
from g2d.errors import ConfigError
from g2d.model.g2d import G2D
from g2d.model.heads import AttentionPool, ProjectionMap, ProjectionTokens
from g2d.model.losses import info_nce
from g2d.model.pseudo_mask import otsu_body_mask, pseudo_mask, quantile_binarise
from g2d.model.towers import TextTower, load_tokenizer

TINY = Model(text_model="tiny", encoder="resnet18", decoder_channels=(16, 8, 8, 4, 4), text_frozen_layers=0,
             max_length=16, embed_dim=16, heads=2)
SIZE = 64


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY)


@pytest.fixture
def model(tokenizer):
    torch.manual_seed(0)
    return G2D(TINY, tokenizer.vocab_size, SIZE)


def batch(tokenizer, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    reports = ["no acute findings", "small left effusion", "right upper lobe opacity", "enlarged heart",
               "calcified granuloma", "left basilar atelectasis", "pneumothorax on the right", "emphysema"][:n]
    tokens = tokenizer(reports, padding="longest", return_tensors="pt")
    return torch.rand(n, 1, SIZE, SIZE, generator=g), tokens["input_ids"], tokens["attention_mask"]


def test_module_shapes(model, tokenizer):
    images, ids, mask = batch(tokenizer)
    image = model.encode_image(images)
    assert image.embedding.shape == (4, 16)
    assert image.attention.shape == (4, 2, 2, 2) and image.projected_map.shape == (4, 16, 2, 2)
    assert model.encode_text(ids, mask).shape == (4, 16)
    assert model.decode(image.features).shape == (4, 1, SIZE, SIZE)
    assert ProjectionMap(8, 4)(torch.rand(2, 8, 3, 3)).shape == (2, 4, 3, 3)
    pooled, attn = AttentionPool(8, 2, grid=3)(torch.rand(2, 8, 5, 4))  # other map sizes: positions resized
    assert pooled.shape == (2, 8) and attn.shape == (2, 2, 5, 4)
    assert torch.all(attn.flatten(2).sum(-1) <= 1 + 1e-6)  # the rest is the mean token's share


def test_token_projection_ignores_padding():
    torch.manual_seed(0)
    proj = ProjectionTokens(8, 4).train()
    tokens = torch.rand(2, 3, 8)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    padded = torch.cat([tokens, torch.rand(2, 4, 8)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    a, b = proj(tokens, mask), proj(padded, padded_mask)
    assert torch.allclose(a[:, 0], b[:, 0], atol=1e-6)  # more padding, same [CLS] embedding
    assert torch.all(b[1, 2:] == 0)


def test_heads_must_divide_d_one_line_naming_both():
    with pytest.raises(ConfigError) as e:
        validate({"model": {"embed_dim": 128, "heads": 3}})
    assert str(e.value) == ("params: model: heads = 3 does not divide embed_dim = 128; pick heads that divide 128 or "
                            "an embed_dim divisible by 3")
    with pytest.raises(ValueError, match=r"d = 10 is not divisible by heads = 3"):
        AttentionPool(10, 3, grid=2)


def test_info_nce_matches_hand_computation_on_3x3():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    text = torch.tensor([[1.0, 0.2], [0.1, 1.0], [-1.0, 1.0]])
    i = image / np.linalg.norm(image, axis=1, keepdims=True)
    t = text / np.linalg.norm(text, axis=1, keepdims=True)
    logits = (i @ t.T).numpy() / 0.07

    def ce(lg):  # mean over rows of -log softmax at the diagonal
        return np.mean([np.log(np.exp(row).sum()) - row[k] for k, row in enumerate(lg)])

    expected = 0.5 * (ce(logits) + ce(logits.T))
    assert math.isclose(float(info_nce(image, text, 0.07)), expected, rel_tol=1e-5)


def test_otsu_body_mask_finds_the_bright_body():
    images = torch.full((1, 1, 32, 32), 0.05)
    images[..., 8:24, 6:26] = 0.7
    assert torch.equal(otsu_body_mask(images), images > 0.5)


def test_85th_percentile_keeps_about_15_percent_of_the_body():
    g = torch.Generator().manual_seed(1)
    values = torch.rand(3, 1, 64, 64, generator=g)
    inside = torch.zeros_like(values, dtype=torch.bool)
    inside[..., 10:60, 5:50] = True
    mask = quantile_binarise(values, inside, 0.85)
    share = mask.flatten(1).sum(1).float() / inside.flatten(1).sum(1)
    assert torch.allclose(share, torch.full_like(share, 0.15), atol=0.01)
    assert not (mask & ~inside).any()


def _attention_and_images(seed=0):
    g = torch.Generator().manual_seed(seed)
    attention = torch.rand(4, 2, 4, 4, generator=g).softmax(-1)
    images = torch.full((4, 1, 32, 32), 0.02)
    images[..., 4:30, 6:26] = 0.6 + 0.1 * torch.rand(4, 1, 26, 20, generator=g)
    return attention, images


def test_pseudo_mask_has_no_parameters_and_no_gradient(model, tokenizer):
    attention, images = _attention_and_images()
    attention.requires_grad_(True)
    mask = pseudo_mask(attention, images, PseudoMask())
    assert not mask.requires_grad and mask.grad_fn is None
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    # through the model: the dense loss trains the encoder and decoder, never the attention pooling
    images, ids, am = batch(tokenizer)
    out = model.losses(images, ids, am, Pretrain(dense="pseudo_seg"), dense_on=True)
    out.dense.backward()
    assert all(p.grad is None for p in model.pool.parameters())
    assert any(p.grad is not None for p in model.unet.decoder.parameters())


def _fraction_in_body(cfg: PseudoMask) -> float:
    attention, images = _attention_and_images()
    mask = pseudo_mask(attention, images, cfg).bool()
    body = otsu_body_mask(images)
    return float((mask & body).sum() / body.sum())


def test_threshold_ablations_keep_the_asked_share():
    base = PseudoMask(smooth=False)
    assert _fraction_in_body(base) == pytest.approx(0.15, abs=0.03)
    assert _fraction_in_body(base.model_copy(update={"threshold": 0.75})) == pytest.approx(0.25, abs=0.03)
    assert _fraction_in_body(base.model_copy(update={"threshold": "median"})) == pytest.approx(0.5, abs=0.03)


def test_head_aggregation_body_mask_smoothing_and_shuffle_switches():
    attention, images = _attention_and_images()
    base = PseudoMask(smooth=False)
    first_head = pseudo_mask(attention[:, :1], images, base)
    assert torch.equal(pseudo_mask(attention, images, base.model_copy(update={"aggregate_heads": False})), first_head)
    assert not torch.equal(pseudo_mask(attention, images, base), first_head)

    outside = ~otsu_body_mask(images)
    assert not (pseudo_mask(attention, images, base).bool() & outside).any()
    no_body = pseudo_mask(attention, images, base.model_copy(update={"body_mask": False})).bool()
    assert (no_body & outside).any()

    smoothed = pseudo_mask(attention, images, PseudoMask(smooth=True))
    assert not torch.equal(smoothed, pseudo_mask(attention, images, base))

    plain = pseudo_mask(attention, images, base)
    shuffled = pseudo_mask(attention, images, base.model_copy(update={"shuffle": True}),
                           torch.Generator().manual_seed(0))
    assert not torch.equal(shuffled, plain)
    assert sorted(m.sum().item() for m in shuffled) == sorted(m.sum().item() for m in plain)  # same masks, moved


def test_dense_modes(model, tokenizer):
    images, ids, am = batch(tokenizer)
    none = model.losses(images, ids, am, Pretrain(dense="none"), dense_on=True)
    assert none.dense.item() == 0 and none.target is None and torch.equal(none.total, none.global_)
    warm = model.losses(images, ids, am, Pretrain(dense="pseudo_seg"), dense_on=False)
    assert warm.dense.item() == 0
    recon = model.losses(images, ids, am, Pretrain(dense="reconstruction"), dense_on=True)
    assert recon.target is images and recon.dense.item() > 0
    seg = model.losses(images, ids, am, Pretrain(dense="pseudo_seg"), dense_on=True)
    assert seg.target.shape == images.shape and seg.dense.item() > 0


def test_frozen_text_layers_take_no_gradient(tokenizer):
    cfg = TINY.model_copy(update={"text_frozen_layers": 1})
    tower = TextTower(cfg, tokenizer.vocab_size)
    frozen = [p for m in (tower.bert.embeddings, tower.bert.encoder.layer[0]) for p in m.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in tower.bert.encoder.layer[1].parameters())
    with pytest.raises(ConfigError, match=r"text_frozen_layers = 5, but 'tiny' has 2 layers"):
        TextTower(TINY.model_copy(update={"text_frozen_layers": 5}), tokenizer.vocab_size)


def test_a_tiny_training_run_lowers_the_loss(model, tokenizer):
    images, ids, am = batch(tokenizer, n=8)
    cfg = Pretrain(dense="pseudo_seg")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(25):
        out = model.losses(images, ids, am, cfg, dense_on=True)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        losses.append(out.total.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_shuffle_never_leaves_an_image_its_own_mask():
    attention, images = _attention_and_images()
    base = PseudoMask(smooth=False)
    plain = pseudo_mask(attention, images, base)
    for seed in range(5):
        shuffled = pseudo_mask(attention, images, base.model_copy(update={"shuffle": True}),
                               torch.Generator().manual_seed(seed))
        assert all(not torch.equal(shuffled[i], plain[i]) for i in range(len(plain)))


def test_training_size_must_fit_the_encoder_stride():
    with pytest.raises(ConfigError, match=r"pretrain.image_size = 100 is invalid: must be a multiple of 32"):
        validate({"pretrain": {"image_size": 100}})


def test_output_stride_16_doubles_the_attention_grid_with_the_same_weights(model, tokenizer):
    """model.output_stride = 16 dilates the encoder's last stage: the same parameters (the pooling's positional
    embedding has a row per grid cell), a 2x finer last map, and the U-Net still decodes to the input size."""
    images, _, _ = batch(tokenizer)
    dilated = G2D(TINY.model_copy(update={"output_stride": 16}), tokenizer.vocab_size, SIZE)
    assert dilated.state_dict().keys() == model.state_dict().keys()
    assert {k for k, v in dilated.state_dict().items() if v.shape != model.state_dict()[k].shape} == {"pool.positional"}
    image = dilated.encode_image(images)
    assert image.attention.shape == (4, 2, 4, 4) and dilated.pool.grid == 4
    assert dilated.decode(image.features).shape == (4, 1, SIZE, SIZE)


def test_an_encoder_that_cannot_be_dilated_is_refused_by_name():
    from g2d.model.towers import build_unet

    with pytest.raises(ConfigError, match=r"model.output_stride = 16: encoder 'vgg11' cannot be dilated .* use "
                                          r"output_stride 32 or a ResNet-family encoder"):
        build_unet(Model(encoder="vgg11", output_stride=16))
    with pytest.raises(ConfigError, match="output_stride"):
        validate({"model": {"output_stride": 8}})
