from __future__ import annotations

from typing import Any

import pytest
import torch

import entitylens.patching.exact as exact
from entitylens.errors import EntitylensError
from entitylens.patching import PatchPair, check_compatible, cross_model_patch


@pytest.fixture(scope="module")
def finetuned(tiny_model: Any) -> Any:
    """The tiny model with only its last layer's MLP changed (a stand-in for a fine-tune of it)."""
    from entitylens.models import load_model

    model = load_model("tiny:llama")
    assert model is not tiny_model
    last = model.cfg.n_layers - 1
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        changed = 0
        for name, p in model.original_model.named_parameters():
            if f"layers.{last}." in name and "mlp" in name and "down_proj" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
                changed += 1
    assert changed == 1
    return model


@pytest.fixture(scope="module")
def other_seed() -> Any:
    from entitylens.models import load_model

    return load_model("tiny:llama?seed=1")


@pytest.mark.parametrize("method", ["fast", "hooks"])
def test_known_transfer_from_a_last_layer_finetune(
    tiny_model: Any, finetuned: Any, pair: PatchPair, method: str
) -> None:
    # Source A = fine-tune, target B = base. They share everything up to the last layer's MLP, so:
    # resid_pre of every layer and positions are identical (0 transfer); the last layer's mlp_out / resid_post
    # at the answer position carry all of A's behaviour (transfer 1); other positions there do nothing (0).
    last = tiny_model.cfg.n_layers - 1
    n = len(pair.clean_tokens)
    pre = cross_model_patch(finetuned, tiny_model, pair, "resid_pre", "layer_pos", method=method)
    assert abs(float(pre.source_logit_diff - pre.target_logit_diff)) > 0.1  # the fine-tune changed the output
    assert pre.normalised.abs().max() <= 1e-6
    for component in ("mlp_out", "resid_post"):
        r = cross_model_patch(finetuned, tiny_model, pair, component, "layer_pos", method=method, layers=[last])
        expected = torch.zeros(n)
        expected[-1] = 1.0
        torch.testing.assert_close(r.normalised[0, 0], expected, atol=1e-4, rtol=0)
    if method == "fast":
        assert pre.n_forward_cells == 0 and pre.path == exact.PATH_FAST


def test_identical_models_transfer_nothing(tiny_model: Any, pair: PatchPair) -> None:
    r = cross_model_patch(tiny_model, tiny_model, pair, "attn_out", "layer_role")
    assert r.n_forward_cells == 0
    assert torch.equal(r.source_logit_diff, r.target_logit_diff)
    assert torch.equal(r.logit_diff, r.target_logit_diff[:, None, None].expand_as(r.logit_diff))
    assert torch.isnan(r.normalised).all()  # no behaviour gap to transfer


def test_matches_a_manual_transformerlens_cross_patch(tiny_model: Any, other_seed: Any, pair: PatchPair) -> None:
    side = pair.corrupted_tokens
    fast = cross_model_patch(
        other_seed,
        tiny_model,
        pair,
        "resid_pre",
        "layer_pos",
        side="corrupted",
        positions=[pair.first_difference, -2, -1],
    )
    hooks = cross_model_patch(
        other_seed,
        tiny_model,
        pair,
        "resid_pre",
        "layer_pos",
        side="corrupted",
        positions=[pair.first_difference, -2, -1],
        method="hooks",
    )
    good, bad = pair.clean_answer, pair.corrupted_answer
    with torch.no_grad():
        la, cache = other_seed.run_with_cache(side[None])
        lb = tiny_model(side[None])
    ld_a = float(la[0, -1, good] - la[0, -1, bad])
    ld_b = float(lb[0, -1, good] - lb[0, -1, bad])
    n = len(side)
    for layer in range(tiny_model.cfg.n_layers):
        for ci, p in enumerate([pair.first_difference, n - 2, n - 1]):
            name = f"blocks.{layer}.hook_resid_pre"

            def hook(act: torch.Tensor, hook: Any, p: int = p, name: str = name) -> torch.Tensor:
                act = act.clone()
                act[:, p] = cache[name][:, p]
                return act

            with torch.no_grad():
                logits = tiny_model.run_with_hooks(side[None], fwd_hooks=[(name, hook)])
            ref = (float(logits[0, -1, good] - logits[0, -1, bad]) - ld_b) / (ld_a - ld_b)
            assert float(hooks.normalised[0, layer, ci]) == pytest.approx(ref, abs=1e-4)
            assert float(fast.normalised[0, layer, ci]) == pytest.approx(ref, abs=1e-4)


@pytest.mark.parametrize(
    ("component", "grid", "kw"),
    [("attn_out", "layer_role", {}), ("head_z", "layer_head", {"roles": ["object", "last"]})],
)
def test_fast_matches_hooks(
    tiny_model: Any, other_seed: Any, diff_pair: PatchPair, component: str, grid: str, kw: dict[str, Any]
) -> None:
    fast = cross_model_patch(other_seed, tiny_model, diff_pair, component, grid, **kw)  # type: ignore[arg-type]
    hooks = cross_model_patch(
        other_seed,
        tiny_model,
        diff_pair,
        component,
        grid,
        method="hooks",  # type: ignore[arg-type]
        **kw,
    )
    assert fast.kind == "cross_model"
    assert (fast.normalised - hooks.normalised).abs().max() <= 1e-4
    assert fast.normalised.abs().max() > 1e-3


@pytest.mark.usefixtures("no_shape_checks")
def test_incompatible_models(tiny_model: Any, copy_bridge: Any, pair: PatchPair) -> None:
    from entitylens.models import load_model

    with pytest.raises(EntitylensError, match="different tokenizers"):
        cross_model_patch(copy_bridge, tiny_model, pair)
    deeper = load_model("tiny:llama?layers=3")
    with pytest.raises(EntitylensError, match=r"differ in n_layers \(3 vs 2\)"):
        check_compatible(deeper, tiny_model)
    with pytest.raises(EntitylensError, match="side must be"):
        cross_model_patch(tiny_model, tiny_model, pair, side="both")  # type: ignore[arg-type]
    with pytest.raises(EntitylensError, match="source must be a transformer_lens TransformerBridge"):
        cross_model_patch(object(), tiny_model, pair)
