"""The public API's jaxtyping annotations are checked at run time during the tests (tests/conftest.py).

Each case calls a public function with tensors whose dims contradict its annotation and expects jaxtyping's
type-check error; the same call with consistent dims passes and gives the value computed by hand. Without the
import hook the wrong calls would broadcast or index silently, so these tests fail if the hook is not active.
"""

from __future__ import annotations

import os

import pytest
import torch
from jaxtyping import TypeCheckError

from entitylens.patching.metric import logit_diff, top1_correct
from entitylens.probing.calibrate import fit_scale_bias
from entitylens.probing.metrics import exact_match, f1_score

SHAPE_CHECKS = os.environ.get("ENTITYLENS_SHAPE_CHECKS", "1") != "0"  # as tests/conftest.py reads it
pytestmark = pytest.mark.skipif(not SHAPE_CHECKS, reason="ENTITYLENS_SHAPE_CHECKS=0 switched the shape checks off")


def test_hook_instruments_entitylens() -> None:
    # Behavioural proof that the hook is on: a batch mismatch between logits and answers is refused.
    with pytest.raises(TypeCheckError):
        logit_diff(torch.zeros(3, 5), torch.tensor([0, 1]), 2)  # batch 3 vs 2


def test_logit_diff_consistent_dims_by_hand() -> None:
    logits = torch.tensor([[0.0, 2.0, 5.0], [1.0, -1.0, 0.5]])
    got = logit_diff(logits, torch.tensor([2, 0]), torch.tensor([1, 1]))
    assert got.tolist() == [3.0, 2.0]


def test_top1_correct_rejects_a_vector_of_logits() -> None:
    with pytest.raises(TypeCheckError):
        top1_correct(torch.zeros(5), 0)  # needs [batch, d_vocab]
    assert top1_correct(torch.tensor([[0.0, 1.0]]), 1).tolist() == [True]


def test_probe_metrics_refuse_mismatched_targets() -> None:
    pred = torch.tensor([[True, False], [True, True], [False, False]])
    target = torch.tensor([[True, False], [False, True], [False, False]])
    assert exact_match(pred, target).item() == pytest.approx(2 / 3)
    # F1 per target by hand: target 0 tp=1 fp=1 fn=0 -> 2/3; target 1 tp=1 fp=0 fn=0 -> 1
    assert f1_score(pred, target).tolist() == pytest.approx([2 / 3, 1.0])
    with pytest.raises(TypeCheckError):
        exact_match(pred, target[:2])  # n 3 vs 2
    with pytest.raises(TypeCheckError):
        f1_score(pred.float(), target)  # Bool annotated, float given


def test_calibration_refuses_labels_of_another_length() -> None:
    scores = torch.tensor([[[0.0, 2.0], [0.0, -2.0], [0.0, 1.0], [0.0, -1.0]]])  # [P=1, m=4, K=2]
    y = torch.tensor([1, 0, 0, 1])
    theta = fit_scale_bias(scores, y, torch.ones(4), dtype=torch.float64)
    # by hand, logit = a s + b: d/db = sum(sigmoid(z) - y) = 0 at b = 0 (the rows pair up), and
    # d/da = mean((sigmoid(z) - y) s) = (2 sigmoid(a) - 4 sigmoid(-2a)) / 4, zero with the 1e-6 a penalty
    a, b = float(theta[0, 0]), float(theta[0, 1])
    assert abs(b) < 1e-6
    ta = torch.tensor(a, dtype=torch.float64)
    assert abs(float(2 * torch.sigmoid(ta) - 4 * torch.sigmoid(-2 * ta)) / 4 + 1e-6 * a) < 1e-9
    assert a > 0.1
    with pytest.raises(TypeCheckError):
        fit_scale_bias(scores, y[:3], torch.ones(4))  # m 4 vs 3
