"""Hook names for caching: aliases (``resid_post`` ...) expanded per layer, or raw TransformerLens names.

A *hook key* is what the user asks for and what a cache stores under:

- an alias from :data:`HOOK_ALIASES` (``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``,
  ``mlp_out``), expanded to one TransformerLens hook per layer (all layers unless ``layers`` is given);
- a raw hook name with a ``{layer}`` placeholder (``blocks.{layer}.attn.hook_z``), expanded the same way;
- a raw hook name of the model's ``hook_dict`` (``blocks.3.hook_resid_post``, ``hook_embed``), one hook.

Every resolved name is checked against the bridge's ``hook_dict``; an unknown key raises an
:class:`~entitylens.errors.EntitylensError` that lists the closest valid names.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from entitylens.errors import EntitylensError

HOOK_ALIASES: dict[str, str] = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
}
"""Short hook aliases -> TransformerLens hook name pattern (``{layer}`` is filled per layer)."""

_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")


@dataclass(frozen=True)
class HookSpec:
    """One requested hook key, resolved to TransformerLens hook names.

    Attributes:
        key: The key as requested (alias or raw name); tensors are stored under it.
        names: The TransformerLens hook names, one per entry of ``layers``.
        layers: The layer of each name (``-1`` for a hook outside the blocks, e.g. ``hook_embed``).

    """

    key: str
    names: tuple[str, ...]
    layers: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.layers) or not self.names:
            raise ValueError("HookSpec needs one layer per hook name and at least one name")


def _close_names(key: str, hook_names: Collection[str]) -> str:
    pool = list(HOOK_ALIASES) + sorted({_LAYER_RE.sub("blocks.{layer}.", n) for n in hook_names}) + list(hook_names)
    close = difflib.get_close_matches(key, pool, n=5, cutoff=0.5)
    return ", ".join(dict.fromkeys(close)) if close else ", ".join(HOOK_ALIASES)


def resolve_hooks(
    hooks: Sequence[str],
    hook_names: Collection[str],
    n_layers: int,
    layers: Sequence[int] | None = None,
) -> tuple[HookSpec, ...]:
    """Resolve hook keys to TransformerLens hook names.

    Args:
        hooks: Hook keys (aliases, ``{layer}`` patterns or raw names).
        hook_names: The valid hook names (the bridge's ``hook_dict`` keys).
        n_layers: Number of blocks of the model.
        layers: Layers for aliases and ``{layer}`` patterns (default: all, ``0 .. n_layers-1``).

    Returns:
        One :class:`HookSpec` per key, in the given order.

    Raises:
        EntitylensError: Unknown hook, repeated key, empty list or layer out of range.

    """
    hooks = tuple(hooks)
    if not hooks:
        raise EntitylensError("no hooks given; pass at least one, e.g. --hooks resid_post")
    if layers is None:
        layer_list = tuple(range(n_layers))
    else:
        layer_list = tuple(int(x) for x in layers)
        bad = [x for x in layer_list if not 0 <= x < n_layers]
        if bad or not layer_list or len(set(layer_list)) != len(layer_list):
            raise EntitylensError(
                f"layers {list(layer_list)} are not distinct layers of this {n_layers}-layer model; "
                f"choose layers in 0..{n_layers - 1}"
            )
    names_set = set(hook_names)
    specs: list[HookSpec] = []
    for key in hooks:
        if any(s.key == key for s in specs):
            raise EntitylensError(f"hook {key!r} is listed twice; list each hook once")
        if "/" in key:
            raise EntitylensError(f"hook {key!r} contains '/'; give a hook alias or a TransformerLens hook name")
        pattern = HOOK_ALIASES.get(key, key)
        if "{layer}" in pattern:
            names = tuple(pattern.format(layer=layer) for layer in layer_list)
            missing = [n for n in names if n not in names_set]
            if missing:
                raise EntitylensError(
                    f"unknown hook {key!r} (this model has no {missing[0]!r}); "
                    f"use an alias or a hook name such as: {_close_names(key, names_set)}"
                )
            specs.append(HookSpec(key=key, names=names, layers=layer_list))
        else:
            if key not in names_set:
                raise EntitylensError(
                    f"unknown hook {key!r}; use an alias or a hook name such as: {_close_names(key, names_set)}"
                )
            m = _LAYER_RE.match(key)
            specs.append(HookSpec(key=key, names=(key,), layers=(int(m.group(1)) if m else -1,)))
    return tuple(specs)


def resolve_model_hooks(model: Any, hooks: Sequence[str], layers: Sequence[int] | None = None) -> tuple[HookSpec, ...]:
    """:func:`resolve_hooks` against a ``TransformerBridge`` (its ``hook_dict`` and ``cfg.n_layers``).

    Args:
        model: The bridge.
        hooks: Hook keys.
        layers: Layers for aliases (default all).

    Returns:
        The resolved specs.

    """
    return resolve_hooks(hooks, tuple(model.hook_dict), int(model.cfg.n_layers), layers)
