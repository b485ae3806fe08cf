"""Hook aliases and raw hook names resolve against the bridge's hook_dict; bad names give one-line errors."""

from __future__ import annotations

from typing import Any

import pytest

from entitylens.activations.hooks import HOOK_ALIASES, resolve_hooks, resolve_model_hooks
from entitylens.errors import EntitylensError


def test_aliases_expand_per_layer(tiny_model: Any) -> None:
    n = tiny_model.cfg.n_layers
    specs = resolve_model_hooks(tiny_model, list(HOOK_ALIASES))
    assert [s.key for s in specs] == list(HOOK_ALIASES)
    by_key = {s.key: s for s in specs}
    assert by_key["resid_post"].names == tuple(f"blocks.{i}.hook_resid_post" for i in range(n))
    assert by_key["attn_out"].names == tuple(f"blocks.{i}.hook_attn_out" for i in range(n))
    assert by_key["mlp_out"].layers == tuple(range(n))
    for s in specs:
        assert all(name in tiny_model.hook_dict for name in s.names)


def test_layers_subset_patterns_and_raw_names(tiny_model: Any) -> None:
    specs = resolve_model_hooks(tiny_model, ["resid_pre", "blocks.{layer}.attn.hook_z", "blocks.1.hook_mlp_out"], [1])
    assert specs[0].names == ("blocks.1.hook_resid_pre",) and specs[0].layers == (1,)
    assert specs[1].names == ("blocks.1.attn.hook_z",)
    assert specs[2].names == ("blocks.1.hook_mlp_out",) and specs[2].layers == (1,)
    [embed] = resolve_model_hooks(tiny_model, ["hook_embed"])
    assert embed.layers == (-1,)


@pytest.mark.parametrize(
    ("hooks", "layers", "message"),
    [
        (["resid_psot"], None, r"unknown hook 'resid_psot'; use an alias or a hook name such as: resid_post"),
        (["blocks.0.hook_resid_pots"], None, r"blocks\.0\.hook_resid_post"),
        (["blocks.{layer}.hook_nope"], None, r"this model has no 'blocks\.0\.hook_nope'"),
        (["resid_post", "resid_post"], None, "listed twice"),
        ([], None, "no hooks given"),
        (["resid_post"], [0, 5], r"choose layers in 0\.\.1"),
        (["resid_post"], [0, 0], "not distinct"),
    ],
)
def test_bad_hooks(tiny_model: Any, hooks: list[str], layers: list[int] | None, message: str) -> None:
    with pytest.raises(EntitylensError, match=message) as info:
        resolve_model_hooks(tiny_model, hooks, layers)
    assert "\n" not in str(info.value)


def test_resolve_hooks_without_a_model() -> None:
    names = {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "hook_embed"}
    [spec] = resolve_hooks(["resid_post"], names, 2)
    assert spec.names == ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
    with pytest.raises(EntitylensError, match="this model has no 'blocks.0.hook_attn_out'"):
        resolve_hooks(["attn_out"], names, 2)
