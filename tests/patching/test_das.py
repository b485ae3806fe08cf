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
    out = train_das(tiny_model, pairs, [0, 1], "last", DASConfig(k=2, steps=3, batch=2, behaving_only=False),
                    targets=[diff_pair.clean_answer] * 6)
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
    flipped = [PatchPair(p.corrupted_tokens, p.clean_tokens, p.clean_answer, p.corrupted_answer,
                         counterfactual_answer=p.clean_answer) for p in pairs]
    with pytest.raises(EntitylensError, match="gets right both ways"):
        train_das(var_model, flipped, [0], "last")  # the model prefers the other answer on every clean prompt
    bare = [PatchPair(p.clean_tokens, p.corrupted_tokens, p.clean_answer, p.corrupted_answer, name=p.name)
            for p in pairs]
    for call in (lambda: train_das(var_model, bare, [0], "last"),
                 lambda: interchange_iia(var_model, bare, 0, "last", torch.eye(32)[:, :1])):
        with pytest.raises(EntitylensError, match=r"6 of 6 pairs \(e.g. 'v0'\) have no causal-model answer"):
            call()
    assert bool(interchange_iia(var_model, bare, 0, "last", torch.eye(32)[:, :1],
                                targets=[p.clean_answer for p in bare]).all())  # explicit targets still work
    with pytest.raises(EntitylensError, match="counterfactual_answer must be a token id other than"):
        PatchPair(pairs[0].clean_tokens, pairs[0].corrupted_tokens, 12, 13, counterfactual_answer=13)


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


def _write_probe(run_dir: Any, coef: torch.Tensor, hook: str, layers: list[int], columns: list[str]) -> None:
    """A probe run's weights file in the format `entitylens probe` writes (raw-space coef per role)."""
    import json

    from safetensors.torch import save_file

    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {"format": "entitylens.probe_weights/1", "target": "t", "hook": hook, "layers": json.dumps(layers),
            "columns": json.dumps(columns), "roles": json.dumps(["last"])}
    save_file({"last/coef": coef.contiguous(), "last/intercept": torch.zeros(len(layers), len(columns))},
              str(run_dir / "probe_weights.safetensors"), metadata=meta)


def test_probe_directions_as_a_basis(var_model: Any, tmp_path: Any) -> None:
    from entitylens.pipelines.circuits import probe_subspaces

    coef = torch.zeros(2, 32, 3)
    coef[0, 0, 0] = 3.0  # column "plus" at resid_post 0 reads dim 0 (the variable)
    coef[0, 5, 1] = -2.0  # column "noise" reads dim 5
    coef[0, 0, 2] = 1.0  # column "dup" is parallel to "plus": rank 2 for all three
    coef[1, 7, 0] = 1.0
    _write_probe(tmp_path / "post", coef, "resid_post", [0, 1], ["plus", "noise", "dup"])
    got = probe_subspaces(tmp_path / "post", [1, 2], 32)  # resid_pre 1 = resid_post 0
    assert got[1].shape == (32, 2) and got[2].shape == (32, 1)
    torch.testing.assert_close(got[1].T @ got[1], torch.eye(2), atol=1e-6, rtol=0)
    w = coef[0]
    torch.testing.assert_close(got[1] @ (got[1].T @ w), w, atol=1e-6, rtol=0)  # spans every probe direction
    _write_probe(tmp_path / "pre", coef, "resid_pre", [0, 1], ["plus", "noise", "dup"])
    (plus,) = probe_subspaces(tmp_path / "pre", [0], 32, columns=["plus"]).values()
    assert abs(float(plus[0, 0])) == pytest.approx(1.0)
    assert bool(interchange_iia(var_model, variable_pairs(12), 0, "last", plus).all())
    (noise,) = probe_subspaces(tmp_path / "pre", [0], 32, columns=["noise"]).values()
    assert not bool(interchange_iia(var_model, variable_pairs(12), 0, "last", noise).any())


@pytest.mark.usefixtures("no_shape_checks")
def test_probe_basis_errors(tmp_path: Any) -> None:
    from entitylens.pipelines.circuits import probe_subspaces

    coef = torch.zeros(1, 32, 1)
    coef[0, 0, 0] = 1.0
    _write_probe(tmp_path / "post", coef, "resid_post", [0], ["plus"])
    with pytest.raises(EntitylensError, match=r"resid_pre 0 is resid_post -1, which the probe run did not probe"):
        probe_subspaces(tmp_path / "post", [0], 32)
    with pytest.raises(EntitylensError, match="'minus' is not one of the probe's 1 columns"):
        probe_subspaces(tmp_path / "post", [1], 32, columns=["minus"])
    with pytest.raises(EntitylensError, match="the probe is 32 wide and the model 64"):
        probe_subspaces(tmp_path / "post", [1], 64)
    _write_probe(tmp_path / "attn", coef, "attn_out", [0], ["plus"])
    with pytest.raises(EntitylensError, match="not the residual stream"):
        probe_subspaces(tmp_path / "attn", [1], 32)
    with pytest.raises(EntitylensError, match="does not exist; rerun `entitylens probe`"):
        probe_subspaces(tmp_path / "none", [1], 32)


def test_whole_site_iia_equals_naive_hook_patching(tiny_model: Any) -> None:
    """basis = identity is activation patching of resid_pre at the role: checked with plain TransformerLens hooks."""
    from entitylens.patching.pair_build import build_pairs
    from entitylens.patching.pair_tokens import to_patch_pairs
    from entitylens.task.generate import GeneratorConfig, generate_states

    text = build_pairs(generate_states(GeneratorConfig(seed=3, num_states=40)), "op_object", seed=0, max_pairs=6,
                       cross_query=True)
    pairs = to_patch_pairs(tiny_model, text, roles=["changed_object", "last"])
    assert all(p.clean_answer != p.counterfactual_answer for p in pairs)
    for layer, role in ((0, "changed_object"), (1, "last"), (1, "changed_object")):
        ours = interchange_iia(tiny_model, pairs, layer, role, torch.eye(64))
        naive = []
        for p in pairs:
            _, cache = tiny_model.run_with_cache(p.clean_tokens[None])
            src = cache[f"blocks.{layer}.hook_resid_pre"][0, p.clean_roles[role]]

            def hook(act: torch.Tensor, hook: Any, pos: int = p.corrupted_roles[role], src: Any = src) -> torch.Tensor:
                act = act.clone()
                act[0, pos] = src
                return act

            logits = tiny_model.run_with_hooks(p.corrupted_tokens[None],
                                               fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", hook)])
            row = logits[0, p.corrupted_answer_pos]
            # the causal model's answer must beat the base's own answer and the source's own (copying the answer)
            margin = float(row[p.counterfactual_answer] - max(row[p.corrupted_answer], row[p.clean_answer]))
            assert abs(margin) > 1e-4  # no near-tie that float order could flip
            naive.append(margin > 0)
        assert ours.tolist() == naive, (layer, role)
