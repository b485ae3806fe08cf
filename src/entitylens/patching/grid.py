"""Checks of patching inputs and the resolution of a grid into per-pair cells.

Every entry point (:func:`~entitylens.patching.exact.patch_grid`,
:func:`~entitylens.patching.attribution.attribution_grid`,
:func:`~entitylens.patching.cross_model.cross_model_patch`) checks its model, component/grid/method, pairs and
tokens here, resolves ``layers=`` and ``roles=``, and turns the grid into columns: :func:`grid_columns` gives,
per pair, each column's source positions, target positions and head.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from entitylens.errors import EntitylensError
from entitylens.patching.types import COMPONENTS, GRIDS, PatchPair, tokenizer_fingerprint

__all__ = [
    "check_batch_cells",
    "check_component_grid",
    "check_model",
    "check_tokens",
    "grid_columns",
    "pairs_list",
    "resolve_layers",
    "resolve_roles",
]


def check_model(model: Any, what: str = "model") -> None:
    """Refuse anything but a ``TransformerBridge`` (``what`` names the argument in the message)."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(model, "run_with_hooks") or not hasattr(cfg, "n_layers"):
        raise EntitylensError(
            f"{what} must be a transformer_lens TransformerBridge, got {type(model).__name__}; "
            f"load it with entitylens.models.load_model"
        )


def check_component_grid(component: str, grid: str, method: str) -> None:
    """Refuse an unknown component, grid or method, and ``head_z`` off the ``layer_head`` grid (or vice versa)."""
    if component not in COMPONENTS:
        raise EntitylensError(f"unknown component {component!r}; use one of {', '.join(COMPONENTS)}")
    if grid not in GRIDS:
        raise EntitylensError(f"unknown grid {grid!r}; use one of {', '.join(GRIDS)}")
    if (component == "head_z") != (grid == "layer_head"):
        fix = "use grid='layer_head'" if component == "head_z" else "use component='head_z'"
        raise EntitylensError(f"component {component!r} does not go with grid {grid!r}; {fix}")
    if method not in ("fast", "hooks"):
        raise EntitylensError(f"unknown method {method!r}; use 'fast' or 'hooks'")


def check_tokens(model: Any, pairs: Sequence[PatchPair]) -> None:
    """Refuse pairs longer than the model's context, tokenized by another tokenizer, or with ids past its vocab."""
    tok = getattr(model, "tokenizer", None)
    fp = None
    d_vocab = int(model.cfg.d_vocab)
    n_ctx = int(getattr(model.cfg, "n_ctx", 0) or 0)
    for i, p in enumerate(pairs):
        longest = max(len(p.clean_tokens), len(p.corrupted_tokens))
        if n_ctx and longest > n_ctx:
            raise EntitylensError(
                f"pair {i}: prompt has {longest} tokens, more than the model's context of {n_ctx}; shorten the "
                "prompts (drop the few-shot prefix) or use a model with a longer context"
            )
        if p.tokenizer_fingerprint is not None and tok is not None:
            fp = fp or tokenizer_fingerprint(tok)
            if p.tokenizer_fingerprint != fp:
                raise EntitylensError(
                    f"pair {i} was tokenized with a different tokenizer than the model's; "
                    f"rebuild the pairs with the model's tokenizer"
                )
        hi = max(int(p.clean_tokens.max()), int(p.corrupted_tokens.max()), p.clean_answer, p.corrupted_answer)
        if hi >= d_vocab:
            raise EntitylensError(
                f"pair {i} holds token id {hi} but the model's vocabulary has {d_vocab} "
                f"tokens (tokenizer mismatch); rebuild the pairs with the model's tokenizer"
            )


def resolve_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    """Grid rows as non-negative layer indices (default: every layer; negative = from the end)."""
    if layers is None:
        return list(range(n_layers))
    out = []
    for x in layers:
        v = int(x) + n_layers if int(x) < 0 else int(x)
        if not 0 <= v < n_layers:
            raise EntitylensError(f"layer {x} is outside the model's {n_layers} layers; use 0..{n_layers - 1}")
        out.append(v)
    if len(set(out)) != len(out):
        raise EntitylensError("layers= repeats a layer; list each layer once")
    return out


def resolve_roles(roles: Sequence[str] | None, pairs: Sequence[PatchPair]) -> list[str]:
    """The roles to patch (default: every role all pairs have, ``last`` at the end); each must be on both sides."""
    if roles is None:
        first = list(pairs[0].clean_roles)
        roles = [r for r in first if r != "last"] + ["last"]
        roles = [r for r in roles if all(r in p.clean_roles for p in pairs)]
    roles = [str(r) for r in roles]
    if not roles:
        raise EntitylensError("roles= is empty; name at least one role, e.g. roles=['last']")
    if len(set(roles)) != len(roles):
        raise EntitylensError("roles= repeats a role; list each role once")
    for i, p in enumerate(pairs):
        for r in roles:
            for side, m in (("clean", p.clean_roles), ("corrupted", p.corrupted_roles)):
                if r not in m:
                    raise EntitylensError(
                        f"role {r!r} missing from the {side} side of pair {i}; add it to "
                        f"{side}_roles or drop it from roles="
                    )
    return roles


def grid_columns(
    grid: str,
    pairs: Sequence[PatchPair],
    roles: Sequence[str] | None,
    positions: Sequence[int] | None,
    n_heads: int,
    src_side: str,
    dst_side: str,
) -> tuple[list[str], list[list[tuple[int, tuple[int, ...], tuple[int, ...], int | None]]]]:
    """Column labels, and per pair the columns as ``(ci, src positions, dst positions, head)``."""

    def toks(p: PatchPair, side: str) -> Tensor:
        return p.clean_tokens if side == "clean" else p.corrupted_tokens

    def role_map(p: PatchPair, side: str) -> Mapping[str, int]:
        return p.clean_roles if side == "clean" else p.corrupted_roles

    per_pair: list[list[tuple[int, tuple[int, ...], tuple[int, ...], int | None]]] = []
    if grid == "layer_role":
        names = resolve_roles(roles, pairs)
        for p in pairs:
            sm, dm = role_map(p, src_side), role_map(p, dst_side)
            per_pair.append([(ci, (sm[r],), (dm[r],), None) for ci, r in enumerate(names)])
        return names, per_pair
    for i, p in enumerate(pairs):
        if (grid == "layer_pos" or roles is None) and len(toks(p, src_side)) != len(toks(p, dst_side)):
            what = "layer_pos" if grid == "layer_pos" else "layer_head without roles="
            raise EntitylensError(
                f"pair {i} has clean/corrupted prompts of different lengths, which {what} "
                f"cannot align; use grid='layer_role' (or pass roles=)"
            )
    if grid == "layer_pos":
        if positions is None:
            n_max = max(len(toks(p, dst_side)) for p in pairs)
            wanted = list(range(n_max))
        else:
            wanted = [int(x) for x in positions]
            if len(set(wanted)) != len(wanted):
                raise EntitylensError("positions= repeats a position; list each position once")
        names = [str(x) for x in wanted]
        for p in pairs:
            n = len(toks(p, dst_side))
            cols: list[tuple[int, tuple[int, ...], tuple[int, ...], int | None]] = []
            for ci, x in enumerate(wanted):
                q = x + n if x < 0 else x
                if 0 <= q < n:
                    cols.append((ci, (q,), (q,), None))
            per_pair.append(cols)
        return names, per_pair
    # layer_head
    names = [f"H{h}" for h in range(n_heads)]
    role_names = None if roles is None else resolve_roles(roles, pairs)
    for p in pairs:
        if role_names is None:
            n = len(toks(p, dst_side))
            sp = dp = tuple(range(n))
        else:
            sm, dm = role_map(p, src_side), role_map(p, dst_side)
            sp = tuple(sm[r] for r in role_names)
            dp = tuple(dm[r] for r in role_names)
        per_pair.append([(h, sp, dp, h) for h in range(n_heads)])
    return names, per_pair


def check_batch_cells(batch_cells: int) -> int:
    """``batch_cells`` itself, once checked to be a positive int."""
    if isinstance(batch_cells, bool) or not isinstance(batch_cells, int) or batch_cells < 1:
        raise EntitylensError(f"batch_cells must be a positive int, got {batch_cells!r}; e.g. batch_cells=32")
    return batch_cells


def pairs_list(pairs: PatchPair | Sequence[PatchPair]) -> list[PatchPair]:
    """One pair or a sequence of pairs as a non-empty list, every item checked to be a :class:`PatchPair`."""
    out = [pairs] if isinstance(pairs, PatchPair) else list(pairs)
    if not out:
        raise EntitylensError("no pairs given; pass at least one PatchPair")
    for i, p in enumerate(out):
        if not isinstance(p, PatchPair):
            raise EntitylensError(
                f"pairs[{i}] is a {type(p).__name__}, not a PatchPair; build pairs with "
                f"PatchPair(...) or PatchPair.from_texts(...)"
            )
    return out
