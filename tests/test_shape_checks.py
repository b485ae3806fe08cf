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
