"""Retrieval recall and the learning-rate schedule, on hand-made numbers."""

import pytest
import torch

from g2d.pipeline.pretrain import lr_lambda
from g2d.pipeline.pretrain_eval import recall_at_k


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
