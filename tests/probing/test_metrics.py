"""Probe metrics against scikit-learn and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from entitylens.errors import EntitylensError
from entitylens.probing.metrics import (
    accuracy,
    balanced_accuracy,
    binary_counts,
    exact_match,
    f1_score,
    micro_f1,
    stratified_accuracy,
    wald_interval,
    wilson_interval,
)

skm = pytest.importorskip("sklearn.metrics")


@pytest.fixture(scope="module")
def sparse_binary():
    """Two 'layers' of predictions for 4 sparse targets (like box contents), incl. an all-negative target."""
    rng = np.random.default_rng(0)
    y = rng.random((50, 4)) < np.array([0.1, 0.3, 0.05, 0.0])
    pred = np.stack([rng.random((50, 4)) < 0.2, y ^ (rng.random((50, 4)) < 0.1)])
    return torch.tensor(pred), torch.tensor(y)


def test_binary_metrics_match_sklearn_per_layer_and_target(sparse_binary):
    pred, y = sparse_binary
    bal, f1 = balanced_accuracy(pred, y), f1_score(pred, y)
    assert bal.shape == f1.shape == (2, 4)
    with pytest.warns(UserWarning):  # sklearn warns on the target with no positives; we follow its values
        for layer in range(2):
            for t in range(4):
                yt, pt = y[:, t].numpy(), pred[layer, :, t].numpy()
                assert bal[layer, t].item() == pytest.approx(skm.balanced_accuracy_score(yt, pt))
                assert f1[layer, t].item() == pytest.approx(skm.f1_score(yt, pt, zero_division=0.0))
    for layer in range(2):
        assert micro_f1(pred, y)[layer].item() == pytest.approx(skm.f1_score(y.numpy(), pred[layer].numpy(),
                                                                             average="micro"))
        assert exact_match(pred, y)[layer].item() == pytest.approx(skm.accuracy_score(y.numpy(), pred[layer].numpy()))


def test_always_no_probe_has_high_accuracy_but_chance_balanced_accuracy():
    y = torch.zeros(100, 1, dtype=torch.bool)
    y[:3] = True
    pred = torch.zeros(1, 100, 1, dtype=torch.bool)
    assert accuracy(pred[..., 0], y[:, 0]).item() == pytest.approx(0.97)
    assert balanced_accuracy(pred, y).item() == pytest.approx(0.5)
    assert f1_score(pred, y).item() == 0.0


def test_counts_and_accuracy_by_hand():
    y = torch.tensor([[1, 0], [1, 1], [0, 0], [0, 1]], dtype=torch.bool)
    p = torch.tensor([[1, 1], [0, 1], [0, 0], [0, 0]], dtype=torch.bool)
    c = binary_counts(p, y)
    assert c.tp.tolist() == [1, 1] and c.fp.tolist() == [0, 1] and c.fn.tolist() == [1, 1] and c.tn.tolist() == [2, 1]
    assert exact_match(p, y).item() == pytest.approx(0.25)  # only row 2 is entirely right
    assert accuracy(torch.tensor([[3, 1, 2], [3, 3, 3]]), torch.tensor([3, 1, 0])).tolist() == pytest.approx([2 / 3,
                                                                                                          1 / 3])


def test_wilson_and_wald_intervals_by_hand():
    lo, hi = wilson_interval(torch.tensor(8), torch.tensor(10))
    # Wilson 95% for 8/10 (e.g. Newcombe 1998 / any table): 0.4902 .. 0.9433
    assert lo.item() == pytest.approx(0.4902, abs=1e-4) and hi.item() == pytest.approx(0.9433, abs=1e-4)
    lo, hi = wilson_interval(torch.tensor(0), torch.tensor(20))
    assert lo.item() == 0.0 and hi.item() == pytest.approx(1.96**2 / (20 + 1.96**2), abs=1e-12)
    lo, hi = wald_interval(torch.tensor(30), torch.tensor(100))
    half = 1.96 * math.sqrt(0.3 * 0.7 / 100)
    assert lo.item() == pytest.approx(0.3 - half) and hi.item() == pytest.approx(0.3 + half)
    lo, hi = wald_interval(torch.tensor(0), torch.tensor(5))
    assert lo.item() == hi.item() == 0.0  # Wald collapses at p = 0: why Wilson is the default


def test_numops_stratified_accuracy_by_hand():
    numops = torch.tensor([0, 0, 0, 1, 1, 3, 3, 3, 3, 0])
    correct = torch.tensor([
        [1, 1, 0, 1, 0, 0, 0, 1, 0, 1],  # layer 0
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 1],  # layer 1
    ], dtype=torch.bool)
    s = stratified_accuracy(correct, numops)
    assert s.strata.tolist() == [0, 1, 3]
    assert s.count.tolist() == [4, 2, 4]
    assert s.correct.tolist() == [[3, 1, 1], [4, 2, 1]]
    np.testing.assert_allclose(s.accuracy.numpy(), [[0.75, 0.5, 0.25], [1.0, 1.0, 0.25]])
    lo, hi = wilson_interval(torch.tensor(3), torch.tensor(4))
    assert s.low[0, 0].item() == pytest.approx(lo.item()) and s.high[0, 0].item() == pytest.approx(hi.item())
    rows = s.rows()
    assert len(rows) == 6 and rows[4] == {"layer": 1, "stratum": 1, "n": 2, "correct": 2, "accuracy": 1.0,
                                          "low": pytest.approx(s.low[1, 1].item()),
                                          "high": pytest.approx(s.high[1, 1].item())}
    wald = stratified_accuracy(correct, numops, method="wald")
    assert wald.low[1, 0].item() == 1.0  # 4/4: Wald has zero width


@pytest.mark.usefixtures("no_shape_checks")
def test_metric_input_errors():
    with pytest.raises(EntitylensError, match="number of examples"):
        accuracy(torch.zeros(2, 5), torch.zeros(4))
    with pytest.raises(EntitylensError, match="strata"):
        stratified_accuracy(torch.zeros(2, 5, dtype=torch.bool), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(EntitylensError, match="wilson"):
        stratified_accuracy(torch.zeros(5, dtype=torch.bool), torch.zeros(5, dtype=torch.int64), method="exact")
