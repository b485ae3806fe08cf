from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from entitylens.patching.metric import answer_metrics, answer_probability, logit_diff, normalise, top1_correct

LOGITS = torch.tensor([[2.0, -1.0, 0.5, 3.0], [0.0, 4.0, 1.0, -2.0]])


def test_logit_diff_hand_computed() -> None:
    # row 0: logit[3] - logit[0] = 3 - 2; row 1: logit[3] - logit[0] = -2 - 0
    assert logit_diff(LOGITS, 3, 0).tolist() == [1.0, -2.0]
    # per-row answers: row 0 -> 2 vs 1 = 0.5 - (-1); row 1 -> 0 vs 1 = 0 - 4
    assert logit_diff(LOGITS, torch.tensor([2, 0]), torch.tensor([1, 1])).tolist() == [1.5, -4.0]


def test_probability_matches_numpy_softmax() -> None:
    x = LOGITS.double().numpy()
    soft = np.exp(x - x.max(1, keepdims=True))
    soft /= soft.sum(1, keepdims=True)
    got = answer_probability(LOGITS, torch.tensor([3, 2]))
    np.testing.assert_allclose(got.numpy(), [soft[0, 3], soft[1, 2]], rtol=1e-6)


def test_probability_is_stable_for_huge_logits() -> None:
    big = torch.tensor([[1000.0, 0.0, -1000.0]])
    assert answer_probability(big, 0).item() == pytest.approx(1.0)
    assert answer_probability(big, 1).item() == pytest.approx(math.exp(-1000.0), abs=1e-30)


def test_top1() -> None:
    assert top1_correct(LOGITS, torch.tensor([3, 3])).tolist() == [True, False]
    assert top1_correct(LOGITS, 1).tolist() == [False, True]


def test_answer_metrics_is_the_three_metrics() -> None:
    ld, prob, top1 = answer_metrics(LOGITS, 3, 1)
    assert torch.equal(ld, logit_diff(LOGITS, 3, 1))
    assert torch.equal(prob, answer_probability(LOGITS, 3))
    assert torch.equal(top1, top1_correct(LOGITS, 3))


def test_normalise_endpoints_and_broadcast() -> None:
    clean = torch.tensor([2.0, -1.0])
    corr = torch.tensor([-2.0, 3.0])
    grid = torch.stack([torch.stack([clean[i].expand(3), corr[i].expand(3)]) for i in range(2)])  # [pair, 2, 3]
    out = normalise(grid, clean, corr)
    assert out[:, 0].eq(1.0).all() and out[:, 1].eq(0.0).all()
    # midpoint -> 0.5, and (value - corr) / (clean - corr) by hand
    assert normalise(torch.tensor([0.0]), 2.0, -2.0).item() == 0.5
    assert normalise(torch.tensor([[5.0]]), torch.tensor([1.0]), torch.tensor([3.0])).item() == -1.0


def test_normalise_zero_gap_is_nan_not_inf() -> None:
    out = normalise(torch.tensor([[1.0, 2.0], [0.5, 0.0]]), torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0]))
    assert torch.isnan(out[0]).all()
    assert out[1].tolist() == [0.25, 0.0]
