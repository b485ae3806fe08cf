from __future__ import annotations

import functools
import warnings
from typing import Any

import pytest
import torch
from patching_helpers import CLEAN, CORRUPTED, copy_pair, ids, peaked_answers, same_length_objects
from transformer_lens import patching as tlp

import entitylens.patching.engine_fast as engine_fast
import entitylens.patching.exact as exact
from entitylens.errors import EntitylensError
from entitylens.patching import PatchPair, PatchResult, patch_grid, tokenizer_fingerprint

POSITION_COMPONENTS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


# --------------------------------------------------------------------------------------------------
# Independent reference: TransformerLens 4.3's own patching functions on the same bridge
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def _bridge_ld(model: Any, tokens: torch.Tensor, pos: int, good: int, bad: int) -> float:
    logits = model(tokens[None])[0, pos]
    return float(logits[good] - logits[bad])


@functools.cache
def _tl_grid(model: Any, pair: PatchPair, name: str) -> torch.Tensor:
    """TL's grid for ``name`` (a transformer_lens.patching function), normalised with bridge baselines."""
    clean_ld = _bridge_ld(model, pair.clean_tokens, pair.clean_answer_pos, pair.clean_answer, pair.corrupted_answer)
    corr_ld = _bridge_ld(
        model, pair.corrupted_tokens, pair.corrupted_answer_pos, pair.clean_answer, pair.corrupted_answer
    )

    def metric(logits: torch.Tensor) -> torch.Tensor:
        row = logits[0, pair.corrupted_answer_pos]
        return ((row[pair.clean_answer] - row[pair.corrupted_answer]) - corr_ld) / (clean_ld - corr_ld)

    _, cache = model.run_with_cache(pair.clean_tokens[None])
    with torch.no_grad():
        return getattr(tlp, name)(model, pair.corrupted_tokens[None], cache, metric).detach().float().cpu()


@pytest.mark.parametrize("method", ["fast", "hooks"])
@pytest.mark.parametrize(
    ("component", "tl_name"),
    [
        ("resid_pre", "get_act_patch_resid_pre"),
        ("attn_out", "get_act_patch_attn_out"),
        ("mlp_out", "get_act_patch_mlp_out"),
    ],
)
def test_layer_pos_grid_matches_transformerlens(
    tiny_model: Any, pair: PatchPair, component: str, tl_name: str, method: str
) -> None:
    ours = patch_grid(tiny_model, pair, component, "layer_pos", method=method)
    ref = _tl_grid(tiny_model, pair, tl_name)
    assert ours.normalised.shape == (1, *ref.shape)
    assert ours.path == (exact.PATH_FAST if method == "fast" else exact.PATH_HOOKS)
    assert (ours.normalised[0] - ref).abs().max() <= 1e-4
    assert ref.abs().max() > 0.1  # the grid is not trivially zero


@pytest.mark.parametrize("method", ["fast", "hooks"])
def test_head_grid_matches_transformerlens(tiny_model: Any, pair: PatchPair, method: str) -> None:
    ours = patch_grid(tiny_model, pair, "head_z", "layer_head", method=method)
    ref = _tl_grid(tiny_model, pair, "get_act_patch_attn_head_out_all_pos")
    assert ours.cells == tuple(f"H{h}" for h in range(tiny_model.cfg.n_heads))
    assert (ours.normalised[0] - ref).abs().max() <= 1e-4


def test_resid_post_is_next_layers_resid_pre(tiny_model: Any, pair: PatchPair) -> None:
    ours = patch_grid(tiny_model, pair, "resid_post", "layer_pos")
    ref = _tl_grid(tiny_model, pair, "get_act_patch_resid_pre")
    assert (ours.normalised[0, :-1] - ref[1:]).abs().max() <= 1e-4


@pytest.mark.parametrize("method", ["fast", "hooks"])
def test_resid_mid_patches_the_residual_stream(tiny_model: Any, pair: PatchPair, method: str) -> None:
    # At layer 0, a position whose token is the same on both sides has the same resid_pre, so patching its
    # resid_mid = resid_pre + attn_out is patching attn_out there. (TL's own get_act_patch_resid_mid on a
    # bridge only reaches the MLP input: hook_resid_mid is ln2.hook_in there.)
    ours = patch_grid(tiny_model, pair, "resid_mid", "layer_pos", method=method)
    ref = _tl_grid(tiny_model, pair, "get_act_patch_attn_out")
    same = pair.clean_tokens == pair.corrupted_tokens
    after = torch.arange(len(same)) > pair.first_difference
    cols = same & after
    assert cols.sum() >= 5
    assert (ours.normalised[0, 0][cols] - ref[0][cols]).abs().max() <= 1e-4
    assert ref[0][cols].abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------
# Known answers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "skip"), [("fast", True), ("fast", False), ("hooks", True)])
@pytest.mark.parametrize("component", POSITION_COMPONENTS)
def test_clean_into_clean_gives_the_clean_metric(
    tiny_model: Any, pair: PatchPair, component: str, method: str, skip: bool
) -> None:
    same = PatchPair(
        pair.clean_tokens,
        pair.clean_tokens,
        pair.clean_answer,
        pair.corrupted_answer,
        clean_roles=dict(pair.clean_roles),
        corrupted_roles=dict(pair.clean_roles),
    )
    real = patch_grid(tiny_model, pair, component, "layer_pos", method=method, layers=[0])
    # every cell; the no-skip fast engine (one chunk run per position) on a subset to stay quick
    positions = None if skip or method == "hooks" else [0, 1, pair.first_difference, -2, -1]
    res = patch_grid(tiny_model, same, component, "layer_pos", method=method, skip_noop_cells=skip, positions=positions)
    clean_ld = real.source_logit_diff
    assert torch.equal(res.source_logit_diff, clean_ld)
    norm = exact.normalise(res.logit_diff, clean_ld, real.target_logit_diff)
    if skip:
        # every cell is a provable no-op (either engine): the result is exactly the clean run's metric
        assert res.n_forward_cells == 0
        assert torch.equal(res.logit_diff, clean_ld.expand_as(res.logit_diff))
        assert norm.eq(1.0).all()
    else:
        assert res.n_noop_cells == 0
        assert (res.logit_diff - clean_ld).abs().max() <= 1e-5
        assert (norm - 1.0).abs().max() <= 1e-4
    assert res.top1.eq(res.top1[0, 0, 0]).all()


@pytest.mark.parametrize("method", ["fast", "hooks"])
def test_hand_built_copy_model_heatmaps(copy_bridge: Any, method: str) -> None:
    # The answer flows through the object position into the last position via the only attention head.
    p = copy_pair(obj_pos=3, length=7)
    expected = {
        "resid_pre": [0, 0, 0, 1, 0, 0, 0],
        "attn_out": [0, 0, 0, 0, 0, 0, 1],
        "resid_mid": [0, 0, 0, 0, 0, 0, 1],
        "resid_post": [0, 0, 0, 0, 0, 0, 1],
        "mlp_out": [0, 0, 0, 0, 0, 0, 0],
    }
    for component, heat in expected.items():
        r = patch_grid(copy_bridge, p, component, "layer_pos", method=method)
        assert r.source_logit_diff.item() == pytest.approx(16 / 3, abs=1e-4)  # 4 / rms(0.75), see helper
        assert r.target_logit_diff.item() == pytest.approx(-16 / 3, abs=1e-4)
        torch.testing.assert_close(r.normalised[0, 0], torch.tensor(heat, dtype=torch.float32), atol=1e-5, rtol=0)
        assert r.top1[0, 0].tolist() == [bool(h) for h in heat]
    heads = patch_grid(copy_bridge, p, "head_z", "layer_head", method=method)
    assert heads.normalised.flatten().tolist() == pytest.approx([1.0], abs=1e-5)
    roles = patch_grid(copy_bridge, p, "resid_pre", "layer_role", method=method)
    assert roles.cells == ("object", "filler", "last")
    assert roles.normalised.flatten().tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-5)
    roles = patch_grid(copy_bridge, p, "attn_out", "layer_role", method=method)
    assert roles.normalised.flatten().tolist() == pytest.approx([0.0, 0.0, 1.0], abs=1e-5)


def test_hand_built_object_position_moves(copy_bridge: Any) -> None:
    for obj_pos in (1, 2, 5):
        r = patch_grid(copy_bridge, copy_pair(obj_pos=obj_pos, length=8), "resid_pre", "layer_pos")
        heat = torch.zeros(8)
        heat[obj_pos] = 1
        torch.testing.assert_close(r.normalised[0, 0], heat, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# Fast engine == hooks engine; exactness of the shortcuts; batching; determinism
# --------------------------------------------------------------------------------------------------


def _close(a: PatchResult, b: PatchResult, tol: float = 1e-4) -> None:
    assert a.normalised.shape == b.normalised.shape
    assert torch.equal(torch.isnan(a.normalised), torch.isnan(b.normalised))
    fin = torch.isfinite(a.normalised)
    assert (a.normalised[fin] - b.normalised[fin]).abs().max() <= tol
    assert (a.prob[fin] - b.prob[fin]).abs().max() <= tol
    assert (a.source_logit_diff - b.source_logit_diff).abs().max() <= tol
    assert (a.target_logit_diff - b.target_logit_diff).abs().max() <= tol


@pytest.mark.parametrize("component", POSITION_COMPONENTS)
def test_fast_matches_hooks_on_role_grid_with_different_lengths(
    tiny_model: Any, diff_pair: PatchPair, component: str
) -> None:
    assert not diff_pair.same_length
    fast = patch_grid(tiny_model, diff_pair, component, "layer_role")
    hooks = patch_grid(tiny_model, diff_pair, component, "layer_role", method="hooks")
    assert fast.cells == ("object", "after_object", "verb", "last")
    assert fast.path == exact.PATH_FAST and hooks.path == exact.PATH_HOOKS
    _close(fast, hooks)
    # "verb" precedes the first difference: an exact no-op in every layer
    assert fast.normalised[0, :, 2].eq(0.0).all()


def test_fast_matches_hooks_on_head_roles(tiny_model: Any, diff_pair: PatchPair) -> None:
    fast = patch_grid(tiny_model, diff_pair, "head_z", "layer_head", roles=["object", "last"])
    hooks = patch_grid(tiny_model, diff_pair, "head_z", "layer_head", roles=["object", "last"], method="hooks")
    _close(fast, hooks)
    assert fast.normalised.abs().max() > 1e-3


@pytest.mark.parametrize("component", ["resid_pre", "resid_post", "mlp_out", "head_z"])
def test_mixed_start_positions_in_one_batch(
    tiny_model: Any, diff_pair: PatchPair, component: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the accelerator batching (rows with different patched positions share one recomputed chunk) on CPU
    grid, kw = (
        ("layer_head", {"roles": ["object", "after_object", "last"]}) if component == "head_z" else ("layer_role", {})
    )
    ref = patch_grid(tiny_model, diff_pair, component, grid, method="hooks", **kw)
    monkeypatch.setattr(engine_fast, "MIX_START_POSITIONS", True)
    mixed = patch_grid(tiny_model, diff_pair, component, grid, batch_cells=5, **kw)
    _close(mixed, ref)


def test_noop_skipping_is_exact(tiny_model: Any, pair: PatchPair) -> None:
    skip = patch_grid(tiny_model, pair, "resid_pre", "layer_pos")
    full = patch_grid(tiny_model, pair, "resid_pre", "layer_pos", skip_noop_cells=False)
    assert skip.n_noop_cells >= pair.first_difference * tiny_model.cfg.n_layers
    assert full.n_noop_cells == 0
    _close(skip, full, tol=1e-5)
    before = skip.logit_diff[0, :, : pair.first_difference]
    assert torch.equal(before, skip.target_logit_diff.expand_as(before))


@pytest.mark.parametrize("method", ["fast", "hooks"])
def test_batching_invariance(tiny_model: Any, pair: PatchPair, diff_pair: PatchPair, method: str) -> None:
    cols = [0, pair.first_difference, pair.first_difference + 1, -3, -1]
    one = patch_grid(tiny_model, pair, "attn_out", "layer_pos", method=method, batch_cells=1, positions=cols)
    many = patch_grid(tiny_model, pair, "attn_out", "layer_pos", method=method, batch_cells=64, positions=cols)
    _close(one, many, tol=1e-5)
    assert torch.equal(one.top1, many.top1)
    both = patch_grid(
        tiny_model, [pair, diff_pair], "resid_pre", "layer_role", roles=["object", "last"], method=method, batch_cells=7
    )
    for i, p in enumerate([pair, diff_pair]):
        single = patch_grid(tiny_model, p, "resid_pre", "layer_role", roles=["object", "last"], method=method)
        torch.testing.assert_close(both.normalised[i], single.normalised[0], atol=1e-5, rtol=0)


def test_determinism_and_save_load(tiny_model: Any, pair: PatchPair, tmp_path: Any) -> None:
    a = patch_grid(tiny_model, pair, "mlp_out", "layer_pos")
    b = patch_grid(tiny_model, pair, "mlp_out", "layer_pos")
    for name, t in a.to_tensors().items():
        assert torch.equal(t, b.to_tensors()[name]), name
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    back = PatchResult.load(tmp_path / "a.safetensors")
    assert back.metadata() == a.metadata()
    for name, t in a.to_tensors().items():
        assert torch.equal(back.to_tensors()[name], t), name
    assert [p.name for p in tmp_path.iterdir()] and not list(tmp_path.glob(".*.tmp"))


def test_subsets_are_slices_of_the_full_grid(tiny_model: Any, pair: PatchPair) -> None:
    full = patch_grid(tiny_model, pair, "resid_pre", "layer_pos")
    n = len(pair.corrupted_tokens)
    sub = patch_grid(tiny_model, pair, "resid_pre", "layer_pos", layers=[-1], positions=[-3, -2, -1])
    assert sub.layers == (tiny_model.cfg.n_layers - 1,) and sub.cells == ("-3", "-2", "-1")
    torch.testing.assert_close(sub.normalised[0, 0], full.normalised[0, -1, n - 3 :], atol=1e-5, rtol=0)


def test_layer_pos_pads_shorter_pairs_with_nan(tiny_model: Any, pair: PatchPair) -> None:
    tok = tiny_model.tokenizer
    a, b = same_length_objects(tok)
    short_c = torch.tensor([tok.bos_token_id] + ids(tok, f"Box 1 contains the {a}. Box 1 contains the"))
    short_x = torch.tensor([tok.bos_token_id] + ids(tok, f"Box 1 contains the {b}. Box 1 contains the"))
    good, bad = peaked_answers(tiny_model, short_c, short_x)
    short = PatchPair(short_c, short_x, good, bad)
    res = patch_grid(tiny_model, [pair, short], "resid_pre", "layer_pos")
    n = len(short_c)
    assert res.normalised.shape[-1] == len(pair.clean_tokens)
    assert torch.isnan(res.normalised[1, :, n:]).all() and torch.isfinite(res.normalised[1, :, :n]).all()


# --------------------------------------------------------------------------------------------------
# The fast engine's activations are the bridge's hook values
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("component", [*POSITION_COMPONENTS, "head_z"])
def test_twin_activations_match_bridge_hooks(tiny_model: Any, pair: PatchPair, component: str) -> None:
    runner = engine_fast.TwinRunner(tiny_model)
    layers = list(range(tiny_model.cfg.n_layers))
    cap = runner.capture(
        pair.clean_tokens, component, layers, pair.clean_answer_pos, pair.clean_answer, pair.corrupted_answer
    )
    _, cache = tiny_model.run_with_cache(pair.clean_tokens[None])
    for layer in layers:
        ref = cache[exact.hook_name(component, layer)][0]
        scale = max(1.0, float(ref.abs().max()))
        assert (cap.acts[layer] - ref).abs().max() <= 1e-4 * scale, (component, layer)


def test_twin_shares_parameters_with_the_bridge(tiny_model: Any) -> None:
    runner = engine_fast.TwinRunner(tiny_model)
    ours = {t.data_ptr() for t in runner.twin.parameters()}
    theirs = {t.data_ptr() for t in tiny_model.original_model.parameters()}
    assert ours <= theirs


def test_unsupported_model_falls_back_to_hooks(
    tiny_model: Any, pair: PatchPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = patch_grid(tiny_model, pair, "attn_out", "layer_pos", method="hooks")
    monkeypatch.setattr(engine_fast, "FAST_MODEL_TYPES", frozenset())
    with pytest.warns(UserWarning, match="fast patching unavailable"):
        res = patch_grid(tiny_model, pair, "attn_out", "layer_pos")
    assert res.path == exact.PATH_HOOKS
    assert torch.equal(res.normalised, ref.normalised)


def test_twin_that_disagrees_with_bridge_falls_back(
    tiny_model: Any, pair: PatchPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_fast.TwinRunner, "verify", lambda self, *a, **k: 0.5)
    with pytest.warns(UserWarning, match="does not reproduce the bridge"):
        res = patch_grid(tiny_model, pair, "resid_pre", "layer_role")
    assert res.path == exact.PATH_HOOKS


# --------------------------------------------------------------------------------------------------
# Pairs and bad input
# --------------------------------------------------------------------------------------------------


def test_from_texts_appends_the_shared_answer_prefix(tiny_model: Any) -> None:
    tok = tiny_model.tokenizer
    p = PatchPair.from_texts(tok, CLEAN, CORRUPTED, " the car", " the map")
    the = ids(tok, " the")
    c_ids, m_ids = ids(tok, " car"), ids(tok, " map")
    k = 0
    while c_ids[k] == m_ids[k]:
        k += 1
    assert p.clean_tokens.tolist() == list(tok(CLEAN)["input_ids"]) + the + c_ids[:k]
    assert p.corrupted_tokens.tolist() == list(tok(CORRUPTED)["input_ids"]) + the + m_ids[:k]
    assert (p.clean_answer, p.corrupted_answer) == (c_ids[k], m_ids[k])
    assert p.tokenizer_fingerprint == tokenizer_fingerprint(tok)
    assert p.clean_roles["last"] == len(p.clean_tokens) - 1


@pytest.mark.usefixtures("no_shape_checks")  # a [1, n] tensor and a list: outside the 1-D annotation, normalised
def test_pair_normalises_positions_and_roles() -> None:
    p = PatchPair(torch.tensor([[1, 2, 3, 4]]), [1, 2, 5, 4, 6], 7, 8, clean_roles={"x": -2}, corrupted_roles={"x": 3})
    assert p.clean_tokens.tolist() == [1, 2, 3, 4] and p.corrupted_tokens.dtype == torch.long
    assert dict(p.clean_roles) == {"x": 2, "last": 3} and dict(p.corrupted_roles) == {"x": 3, "last": 4}
    assert (p.clean_answer_pos, p.corrupted_answer_pos) == (3, 4)
    assert p.first_difference == 2 and not p.same_length
    with pytest.raises(TypeError):
        p.clean_roles["y"] = 1  # type: ignore[index]


@pytest.mark.usefixtures("no_shape_checks")
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clean_answer": 5, "corrupted_answer": 5}, "same token"),
        ({"clean_roles": {"obj": 1}}, r"missing from the corrupted side"),
        ({"corrupted_roles": {"obj": 1}}, r"missing from the clean side"),
        ({"clean_roles": {"obj": 9}, "corrupted_roles": {"obj": 1}}, "outside a prompt"),
        ({"clean_tokens": []}, "non-empty 1-D"),
        ({"clean_tokens": [1.0, 2.0]}, "integer token ids"),
        ({"corrupted_answer_pos": 4}, "outside a prompt"),
    ],
)
def test_bad_pairs(kwargs: dict[str, Any], match: str) -> None:
    base: dict[str, Any] = {
        "clean_tokens": [1, 2, 3],
        "corrupted_tokens": [1, 2, 4],
        "clean_answer": 5,
        "corrupted_answer": 6,
    }
    with pytest.raises(EntitylensError, match=match) as e:
        PatchPair(**{**base, **kwargs})
    assert "\n" not in str(e.value) and ";" in str(e.value)


@pytest.mark.usefixtures("no_shape_checks")
@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("resid_middle", "layer_pos"), {}, "unknown component 'resid_middle'"),
        (("resid_pre", "layer_x"), {}, "unknown grid"),
        (("head_z", "layer_pos"), {}, "use grid='layer_head'"),
        (("resid_pre", "layer_head"), {}, "use component='head_z'"),
        (("resid_pre", "layer_pos"), {"method": "magic"}, "unknown method"),
        (("resid_pre", "layer_pos"), {"layers": [7]}, "outside the model's 2 layers"),
        (("resid_pre", "layer_pos"), {"layers": [0, 0]}, "repeats a layer"),
        (("resid_pre", "layer_pos"), {"batch_cells": 0}, "batch_cells"),
        (("resid_pre", "layer_role"), {"roles": ["nope"]}, "role 'nope' missing"),
        (("resid_pre", "layer_role"), {"roles": []}, "roles= is empty"),
    ],
)
def test_bad_calls(tiny_model: Any, pair: PatchPair, args: tuple[str, str], kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(EntitylensError, match=match) as e:
        patch_grid(tiny_model, pair, *args, **kwargs)
    assert "\n" not in str(e.value)


def test_layer_pos_refuses_different_lengths(tiny_model: Any, diff_pair: PatchPair) -> None:
    with pytest.raises(EntitylensError, match="use grid='layer_role'"):
        patch_grid(tiny_model, diff_pair, "resid_pre", "layer_pos")
    with pytest.raises(EntitylensError, match="pass roles="):
        patch_grid(tiny_model, diff_pair, "head_z", "layer_head")


def test_tokenizer_mismatch(tiny_model: Any, pair: PatchPair, copy_bridge: Any) -> None:
    foreign = PatchPair(
        pair.clean_tokens,
        pair.corrupted_tokens,
        pair.clean_answer,
        pair.corrupted_answer,
        tokenizer_fingerprint=tokenizer_fingerprint(copy_bridge.tokenizer),
    )
    with pytest.raises(EntitylensError, match="different tokenizer"):
        patch_grid(tiny_model, foreign, "resid_pre", "layer_pos")
    # ids beyond the model's vocabulary (pairs made for a bigger vocabulary)
    with pytest.raises(EntitylensError, match="vocabulary has 16 tokens"):
        patch_grid(copy_bridge, pair, "resid_pre", "layer_role")


@pytest.mark.usefixtures("no_shape_checks")
def test_not_pairs_or_model(tiny_model: Any, pair: PatchPair) -> None:
    with pytest.raises(EntitylensError, match="no pairs"):
        patch_grid(tiny_model, [], "resid_pre")
    with pytest.raises(EntitylensError, match="not a PatchPair"):
        patch_grid(tiny_model, [("a", "b")], "resid_pre")  # type: ignore[list-item]
    with pytest.raises(EntitylensError, match="TransformerBridge"):
        patch_grid(torch.nn.Linear(2, 2), pair, "resid_pre")


def test_warnings_are_not_raised_on_the_fast_path(tiny_model: Any, pair: PatchPair) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert patch_grid(tiny_model, pair, "resid_pre", "layer_role").path == exact.PATH_FAST


# --------------------------------------------------------------------------------------------------
# The real SmolLM2 checkpoint (Llama architecture, tied embeddings) through the fast engine
# --------------------------------------------------------------------------------------------------


def test_smollm2_fast_matches_transformerlens(smollm2: Any) -> None:
    from entitylens.models import encode, first_token_ids

    text = (
        "Box 0 contains the car, Box 1 contains the map, Box 2 contains nothing. Put the {} into Box 2. "
        "Box 2 contains the"
    )
    ft = first_token_ids(smollm2, ["coat", "ring"])
    clean, corr = encode(smollm2, text.format("coat")), encode(smollm2, text.format("ring"))
    assert len(clean) == len(corr)
    pair = PatchPair(clean, corr, ft["coat"], ft["ring"])
    layers, positions = [0, 15, 29], [pair.first_difference, len(clean) - 1]
    ours = patch_grid(smollm2, pair, "resid_pre", "layer_pos", layers=layers, positions=positions)
    assert ours.path == exact.PATH_FAST
    clean_ld = _bridge_ld(smollm2, clean, -1, ft["coat"], ft["ring"])
    corr_ld = _bridge_ld(smollm2, corr, -1, ft["coat"], ft["ring"])
    _, cache = smollm2.run_with_cache(clean[None], names_filter=lambda n: n.endswith("hook_resid_pre"))
    for li, layer in enumerate(layers):
        for ci, p in enumerate(positions):

            def hook(act: torch.Tensor, hook: Any, p: int = p, layer: int = layer) -> torch.Tensor:
                act = act.clone()
                act[:, p] = cache[f"blocks.{layer}.hook_resid_pre"][:, p]
                return act

            with torch.no_grad():
                logits = smollm2.run_with_hooks(corr[None], fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", hook)])
            ld = float(logits[0, -1, ft["coat"]] - logits[0, -1, ft["ring"]])
            ref = (ld - corr_ld) / (clean_ld - corr_ld)
            assert abs(float(ours.normalised[0, li, ci]) - ref) <= 1e-4, (layer, p)
