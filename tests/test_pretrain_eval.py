"""Retrieval recall and the learning-rate schedule, on hand-made numbers."""

import pytest
import torch

from g2d.pipeline.pretrain.evaluation import recall_at_k
from g2d.pipeline.pretrain.stage import lr_lambda


def test_recall_at_k_by_hand():
    sim = torch.tensor([[0.9, 0.1, 0.0],   # image 0: its report first
                        [0.8, 0.5, 0.1],   # image 1: its report second
                        [0.7, 0.6, 0.2]])  # image 2: its report third
    r = recall_at_k(sim, ks=(1, 2, 3))
    assert r["i2t_R@1"] == pytest.approx(1 / 3) and r["i2t_R@2"] == pytest.approx(2 / 3) and r["i2t_R@3"] == 1
    # columns: report 0 -> image 0 first; report 1 -> images 2, 1; report 2 -> images 2 first
    assert r["t2i_R@1"] == pytest.approx(2 / 3) and r["t2i_R@2"] == 1


def test_ties_count_against_the_model():
    collapsed = torch.ones(4, 4)  # every image equally close to every report
    r = recall_at_k(collapsed, ks=(1, 4))
    assert r["i2t_R@1"] == 0 and r["t2i_R@1"] == 0 and r["i2t_R@4"] == 1


def test_warmup_then_cosine_to_zero():
    f = lr_lambda(3, 10)
    assert [round(f(s), 3) for s in range(10)] == [0.25, 0.5, 0.75, 1.0, 0.933, 0.75, 0.5, 0.25, 0.067, 0.0]
    assert lr_lambda(20, 5)(4) == 1.0  # a warm-up longer than the run is capped so the peak is reached


def test_pseudo_mask_scores_by_hand_and_chance_by_sampling():
    from g2d.pipeline.pretrain.evaluation import _scores

    body = torch.zeros(1, 10, 10, dtype=torch.bool)
    body[:, :, :5] = True  # 50 pixels
    truth = torch.zeros_like(body)
    truth[:, 0:4, 0:5] = True  # 20 finding pixels, all in the body
    truth[:, 0, 5:] = True  # and 5 outside it
    mask = torch.zeros_like(body)
    mask[:, 0:2, 0:5] = True  # 10 pixels, all on the finding
    s = _scores(mask, body, peak=0, truth=truth)
    assert s["coverage"] == pytest.approx(10 / 25) and s["precision"] == 1 and s["iou"] == pytest.approx(10 / 25)
    assert s["pointing"] == 1 and s["pointing_chance"] == s["precision_chance"] == pytest.approx(20 / 50)
    # chance: random masks of the same area (10) inside the body score these on average
    g = torch.Generator().manual_seed(0)
    inside = torch.nonzero(body.flatten()).flatten()
    draws = []
    for _ in range(4000):
        random = torch.zeros(100, dtype=torch.bool)
        random[inside[torch.randperm(50, generator=g)[:10]]] = True
        hit = float((random & truth.flatten()).sum())
        draws.append((hit / 25, hit / 10, hit / (10 + 25 - hit)))
    mean = [sum(d[i] for d in draws) / len(draws) for i in range(3)]
    assert s["coverage_chance"] == pytest.approx(mean[0], abs=0.01)
    assert s["precision_chance"] == pytest.approx(mean[1], abs=0.01)
    assert s["iou_chance"] == pytest.approx(mean[2], abs=0.02)  # from the expected overlap: close, not exact


class _Attending(torch.nn.Module):
    """Stands in for G2D: its attention is a fixed 4x4 grid whatever the image."""

    def __init__(self, grid: torch.Tensor) -> None:
        super().__init__()
        self.grid = grid

    def encode_image(self, images):
        from types import SimpleNamespace

        return SimpleNamespace(attention=self.grid.expand(len(images), 2, 4, 4))


def test_pseudo_mask_quality_rises_above_chance_only_where_the_attention_looks():
    from g2d.config import PseudoMask
    from g2d.pipeline.pretrain.evaluation import flat_quality, pseudo_mask_quality

    images = torch.full((2, 1, 32, 32), 0.1)
    images[:, :, 4:28, 4:28] = 0.8  # the body
    nodule = torch.zeros(2, 1, 32, 32, dtype=torch.bool)
    nodule[:, :, 8:16, 8:16] = True  # top left of the body
    effusion = torch.zeros_like(nodule)
    effusion[0, :, 20:28, 4:28] = True  # bottom, image 0 only
    tiny = torch.zeros_like(nodule)  # drawn, but under a pixel at this size
    batch = {"image": images, "mask": nodule | effusion,
             "finding_masks": [{"nodule": nodule[0], "effusion": effusion[0]}, {"nodule": nodule[1], "scar": tiny[1]}]}
    looks = torch.zeros(1, 1, 4, 4)
    looks[..., 1, 1] = 1.0  # at the nodule
    cfg = PseudoMask(smooth=False)
    q = pseudo_mask_quality(_Attending(looks), [batch], cfg, torch.device("cpu"))
    assert q["images"] == 2 and set(q["by_kind"]) == {"nodule", "effusion"} and q["unseen"] == {"scar": 1}
    nod = q["by_kind"]["nodule"]
    assert nod["images"] == 2 and nod["pointing"] == 1 > 3 * nod["pointing_chance"]
    assert nod["coverage"] > 2 * nod["coverage_chance"] and nod["precision"] > 2 * nod["precision_chance"]
    assert q["by_kind"]["effusion"]["pointing"] == 0  # it looks at the nodule, not the effusion
    away = torch.zeros(1, 1, 4, 4)
    away[..., 3, 3] = 1.0  # bottom right: the effusion's corner of image 0, nothing of image 1
    q_away = pseudo_mask_quality(_Attending(away), [batch], cfg, torch.device("cpu"))
    assert q_away["by_kind"]["nodule"]["coverage"] == 0 and q_away["by_kind"]["nodule"]["pointing"] == 0
    assert q_away["pointing_chance"] == pytest.approx(q["pointing_chance"])  # the areas of finding and body
    names = flat_quality(q)
    assert {"val/pseudo_mask/coverage", "val/pseudo_mask/iou_chance", "val/pseudo_mask/nodule/pointing"} <= set(names)
