"""The fast engine on every architecture family of the registry, against TransformerLens and the hooks engine.

Gemma-3 (sliding-window and global layers, per-type rotary tables, q/k norms, normalised attention output,
scaled embeddings) with a window far shorter than the prompt, and Qwen2 (q/k/v biases, no BOS).
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from patching_helpers import same_length_pair
from transformer_lens import patching as tlp

import entitylens.patching.engine_fast as engine_fast
import entitylens.patching.exact as exact
from entitylens.models import load_model
from entitylens.patching import PatchPair, patch_grid

SPECS = ("tiny:gemma3?window=8&seed=3", "tiny:qwen2")  # seed 3: a clean/corrupted gap > 1


@functools.cache
def model_and_pair(spec: str) -> tuple[Any, PatchPair]:
    model = load_model(spec)
    pair = same_length_pair(model)
    if "gemma3" in spec:
        assert len(pair.clean_tokens) > 3 * 8  # the prompt runs far past the sliding window
    return model, pair


@functools.cache
def tl_grid(spec: str, name: str) -> torch.Tensor:
    model, pair = model_and_pair(spec)

    @torch.no_grad()
    def ld(tokens: torch.Tensor, pos: int) -> float:
        logits = model(tokens[None])[0, pos]
        return float(logits[pair.clean_answer] - logits[pair.corrupted_answer])

    clean_ld, corr_ld = (
        ld(pair.clean_tokens, pair.clean_answer_pos),
        ld(pair.corrupted_tokens, pair.corrupted_answer_pos),
    )

    def metric(logits: torch.Tensor) -> torch.Tensor:
        row = logits[0, pair.corrupted_answer_pos]
        return ((row[pair.clean_answer] - row[pair.corrupted_answer]) - corr_ld) / (clean_ld - corr_ld)

    _, cache = model.run_with_cache(pair.clean_tokens[None])
    with torch.no_grad():
        return getattr(tlp, name)(model, pair.corrupted_tokens[None], cache, metric).detach().float().cpu()


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("component", ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head_z"])
def test_twin_activations_match_bridge_hooks(spec: str, component: str) -> None:
    model, pair = model_and_pair(spec)
    runner = engine_fast.TwinRunner(model)
    layers = list(range(model.cfg.n_layers))
    cap = runner.capture(
        pair.clean_tokens, component, layers, pair.clean_answer_pos, pair.clean_answer, pair.corrupted_answer
    )
    _, cache = model.run_with_cache(pair.clean_tokens[None])
    for layer in layers:
        if component == "resid_mid":  # the stream between attention and MLP: the next resid_pre minus mlp_out
            ref = cache[exact.hook_name("resid_post", layer)][0] - cache[exact.hook_name("mlp_out", layer)][0]
        else:
            ref = cache[exact.hook_name(component, layer)][0]
        scale = max(1.0, float(ref.abs().max()))
        assert (cap.acts[layer] - ref).abs().max() <= 1e-4 * scale, (component, layer)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize(
    ("component", "tl_name"),
    [
        ("resid_pre", "get_act_patch_resid_pre"),
        ("attn_out", "get_act_patch_attn_out"),
        ("mlp_out", "get_act_patch_mlp_out"),
    ],
)
def test_fast_engine_matches_transformerlens(spec: str, component: str, tl_name: str) -> None:
    model, pair = model_and_pair(spec)
    ours = patch_grid(model, pair, component, "layer_pos")
    ref = tl_grid(spec, tl_name)
    assert ours.path == exact.PATH_FAST  # no fallback to the hooks engine
    assert (ours.normalised[0] - ref).abs().max() <= 1e-4
    assert ref.abs().max() > 0.1


@pytest.mark.parametrize("spec", SPECS)
def test_fast_head_grid_matches_transformerlens(spec: str) -> None:
    model, pair = model_and_pair(spec)
    ours = patch_grid(model, pair, "head_z", "layer_head")
    ref = tl_grid(spec, "get_act_patch_attn_head_out_all_pos")
    assert ours.path == exact.PATH_FAST
    assert (ours.normalised[0] - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("component", ["resid_mid", "resid_post"])
def test_fast_engine_matches_hooks_engine(spec: str, component: str) -> None:
    model, pair = model_and_pair(spec)
    fast = patch_grid(model, pair, component, "layer_pos")
    hooks = patch_grid(model, pair, component, "layer_pos", method="hooks")
    assert fast.path == exact.PATH_FAST and hooks.path == exact.PATH_HOOKS
    assert (fast.normalised - hooks.normalised).abs().max() <= 1e-4
