"""Subspace interchange interventions and DAS: a hand-built model with a known 1-D variable, orthogonality."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from patching_helpers import variable_model, variable_pairs

from entitylens.errors import EntitylensError
from entitylens.patching import PatchPair
from entitylens.patching.das import DASConfig, interchange, interchange_iia, train_das


@pytest.fixture(scope="module")
def var_model() -> Any:
    return variable_model()


def test_interchange_swaps_only_the_subspace() -> None:
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 2, generator=gen))
    hb, hs = torch.randn(3, 6, generator=gen), torch.randn(3, 6, generator=gen)
    out = interchange(hb, hs, q)
    torch.testing.assert_close(out @ q, hs @ q)  # inside: the source's coordinates
    proj = torch.eye(6) - q @ q.T
    torch.testing.assert_close(out @ proj, hb @ proj)  # outside: the base's


def test_known_direction_and_a_random_one(var_model: Any) -> None:
    pairs = variable_pairs(20)
    e0 = torch.zeros(32, 1)
    e0[0, 0] = 1.0
    assert bool(interchange_iia(var_model, pairs, 0, "last", e0).all())
    gen = torch.Generator().manual_seed(3)
    rand, _ = torch.linalg.qr(torch.randn(32, 1, generator=gen))
    assert float(interchange_iia(var_model, pairs, 0, "last", rand).double().mean()) <= 0.6


def test_das_recovers_the_variable_and_stays_orthogonal(var_model: Any) -> None:
    pairs = variable_pairs(40, seed=1)
    (res,) = train_das(var_model, pairs, [0], "last", DASConfig(k=1, steps=60, lr=0.05, batch=8))
    assert res.test_iia >= 0.95 and res.train_iia >= 0.95
    assert abs(float(res.basis[0, 0])) > 0.5  # aligned with dim 0
    (res2,) = train_das(var_model, pairs, [0], "last", DASConfig(k=3, steps=5, lr=0.05, batch=8))
    torch.testing.assert_close(res2.basis.T @ res2.basis, torch.eye(3), atol=1e-5, rtol=0)
    assert sorted(res.train + res.test) == list(range(40)) and not set(res.train) & set(res.test)


def test_das_on_a_tiny_model_runs_every_layer(tiny_model: Any, diff_pair: PatchPair) -> None:
    pairs = [diff_pair] * 6
    out = train_das(tiny_model, pairs, [0, 1], "last", DASConfig(k=2, steps=3, batch=2))
    assert [r.layer for r in out] == [0, 1] and all(r.basis.shape == (64, 2) for r in out)
    assert all(0.0 <= r.test_iia <= 1.0 for r in out)


@pytest.mark.usefixtures("no_shape_checks")
def test_das_errors(var_model: Any) -> None:
    pairs = variable_pairs(6)
    with pytest.raises(EntitylensError, match="larger than d_model"):
        train_das(var_model, pairs, [0], "last", DASConfig(k=33))
    with pytest.raises(EntitylensError, match="at least 4 pairs"):
        train_das(var_model, pairs[:3], [0], "last")
    with pytest.raises(EntitylensError, match="outside the model"):
        train_das(var_model, pairs, [5], "last")
    with pytest.raises(EntitylensError, match="basis must be"):
        interchange_iia(var_model, pairs, 0, "last", torch.zeros(31, 1))
    with pytest.raises(EntitylensError, match="k, steps and batch"):
        DASConfig(k=0)
    flipped = [PatchPair(p.corrupted_tokens, p.clean_tokens, p.clean_answer, p.corrupted_answer) for p in pairs]
    with pytest.raises(EntitylensError, match="gets right both ways"):
        train_das(var_model, flipped, [0], "last")  # the model prefers the other answer on every clean prompt


def test_top1_criterion_and_pairwise_agree_on_the_known_direction(var_model: Any) -> None:
    pairs = variable_pairs(10, seed=4)
    e0 = torch.zeros(32, 1)
    e0[0, 0] = 1.0
    assert bool(interchange_iia(var_model, pairs, 0, "last", e0, criterion="top1").all())
    (res,) = train_das(var_model, pairs, [0], "last", DASConfig(k=1, steps=40, criterion="top1", batch=4))
    assert res.test_iia >= 0.95


def test_pca_basis_matches_numpy_svd_of_the_differences(var_model: Any) -> None:
    import numpy as np

    from entitylens.patching.das import pca_basis

    pairs = variable_pairs(12, seed=2)
    q = pca_basis(var_model, pairs, 0, "last", 2)
    torch.testing.assert_close(q.T @ q, torch.eye(2), atol=1e-5, rtol=0)
    diffs = []
    for p in pairs:
        _, c = var_model.run_with_cache(p.clean_tokens[None])
        _, x = var_model.run_with_cache(p.corrupted_tokens[None])
        diffs.append((c["blocks.0.hook_resid_pre"][0, -1] - x["blocks.0.hook_resid_pre"][0, -1]).double().numpy())
    _, _, vt = np.linalg.svd(np.stack(diffs), full_matrices=False)
    for j in range(2):
        assert abs(float(np.dot(vt[j], q[:, j].double().numpy()))) > 0.999


def test_batched_interventions_equal_one_pair_at_a_time(tiny_model: Any, pair: PatchPair, diff_pair: PatchPair
                                                        ) -> None:
    """Rows of different prompt lengths in one forward (padded, masked prefixes) == each pair on its own."""
    from entitylens.patching.das import _batched_logits, _capture, _engine, _Site

    fp = _engine(tiny_model)
    pairs = [pair, diff_pair, pair]
    caps = _capture(fp, pairs)
    gen = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(64, 3, generator=gen))
    for layer in (0, 1):
        sites = [_Site(fp, p, c, x, layer, "last") for p, (c, x) in zip(pairs, caps, strict=True)]
        with torch.no_grad():
            batched = _batched_logits(fp, sites, basis)
            single = torch.stack([s.logits(basis) for s in sites])
        torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)
        assert len({len(p.corrupted_tokens) for p in pairs}) == 2  # really different lengths
