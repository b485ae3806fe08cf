"""Interventions along directions: null, set or shift the component of a hook's activation along a direction.

:func:`edit_along` is the edit itself, for a unit direction ``u`` and an activation ``h``:

* ``"null"``: ``h - (h . u) u`` -- the component along ``u`` removed (what a linear probe reading ``u`` sees
  becomes its intercept);
* ``"set"``: ``h + (value - h . u) u`` -- the component set to ``value``;
* ``"add"``: ``h + value u`` -- shifted by ``value`` along ``u``.

:func:`run_direction_edits` runs a model over prompts with one edit at a time -- at one token per prompt,
at one hook per layer, for several directions (a probe's, and random controls) -- and returns the logits of
chosen candidate tokens at each prompt's last position, with the whole vocabulary's log-normaliser and
argmax, beside the unedited run. Prompts are left-padded into batches (the activation runner's layout, with
its attention mask); every (prompt, direction) pair of a batch is one sequence, so a batch's forwards are
shared across directions. Batched results equal unbatched ones (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from entitylens.activations.runner import pad_batch, pad_token_id
from entitylens.errors import EntitylensError
from entitylens.progress import progress

__all__ = ["EDIT_MODES", "DirectionRun", "edit_along", "run_direction_edits"]

EditMode = Literal["null", "set", "add"]
EDIT_MODES: tuple[str, ...] = ("null", "set", "add")
"""The edits :func:`edit_along` makes."""


def edit_along(h: Float[Tensor, "*batch d"], u: Float[Tensor, "*ubatch d"], mode: str, value: float = 0.0
               ) -> Float[Tensor, "*batch d"]:
    """Null, set or shift the component of ``h`` along the unit direction ``u``.

    Args:
        h: Activations.
        u: Unit directions (broadcast against ``h``).
        mode: ``"null"``, ``"set"`` or ``"add"`` (see the module docstring).
        value: The component's new value (``set``) or the shift (``add``); unused by ``null``.

    Returns:
        The edited activations.

    Raises:
        EntitylensError: Unknown mode.
    """
    if mode not in EDIT_MODES:
        raise EntitylensError(f"unknown edit mode {mode!r}; use one of {', '.join(EDIT_MODES)}")
    if mode == "add":
        return h + value * u
    proj = (h * u).sum(-1, keepdim=True)
    return h - proj * u if mode == "null" else h + (value - proj) * u


@dataclass(frozen=True)
class DirectionRun:
    """Logits at each prompt's last position, unedited and under every (layer, direction) edit.

    Attributes:
        clean: ``[n, cand]`` candidate logits of the unedited run.
        clean_lse: ``[n]`` log-sum-exp over the whole vocabulary (unedited).
        clean_top: ``[n]`` argmax token over the whole vocabulary (unedited).
        edited: ``[layer, direction, n, cand]`` candidate logits under each edit.
        edited_lse: ``[layer, direction, n]``.
        edited_top: ``[layer, direction, n]``.
    """

    clean: Float[Tensor, "n cand"]
    clean_lse: Float[Tensor, " n"]
    clean_top: Int[Tensor, " n"]
    edited: Float[Tensor, "layer direction n cand"]
    edited_lse: Float[Tensor, "layer direction n"]
    edited_top: Int[Tensor, "layer direction n"]


def _forward(model: Any, ids: Sequence[np.ndarray], pad_id: int, edits: list[tuple[str, Any]]
             ) -> Float[Tensor, "batch vocab"]:
    """Logits at the last position of each left-padded sequence, with ``edits`` as forward hooks."""
    positions = np.zeros((len(ids), 0), dtype=np.int64)
    tokens, mask, _ = pad_batch(ids, positions, pad_id)
    device = torch.device(getattr(model.cfg, "device", None) or "cpu")
    with torch.no_grad(), model.hooks(fwd_hooks=edits):
        logits = model(tokens.to(device), attention_mask=mask.to(device), return_type="logits")
    return logits[:, -1].float().cpu()


def _edited_forward(model: Any, arrays: Sequence[np.ndarray], positions: Sequence[int],
                    chunk: Sequence[tuple[int, int]], hook_name: str, units: Tensor, mode: str, value: float,
                    pad_id: int) -> Float[Tensor, "batch vocab"]:
    """Last-position logits of the (prompt, direction) pairs ``chunk``, each edited at its prompt's position."""
    seqs = [arrays[i] for i, _ in chunk]
    width = max(len(x) for x in seqs)
    rows = torch.arange(len(chunk))
    pos = torch.tensor([width - len(arrays[i]) + int(positions[i]) for i, _ in chunk])  # left padding shifts
    u = units[[v for _, v in chunk]]

    def hook(act: Tensor, hook: Any) -> Tensor:
        act = act.clone()
        act[rows, pos] = edit_along(act[rows, pos], u.to(act.device, act.dtype), mode, value)
        return act

    return _forward(model, seqs, pad_id, [(hook_name, hook)])


def run_direction_edits(
    model: Any,
    ids: Sequence[Sequence[int]],
    positions: Sequence[int],
    hook_names: Sequence[str],
    directions: Float[Tensor, "layer direction d"],
    candidates: Int[Tensor, "n cand"],
    *,
    mode: str = "null",
    value: float = 0.0,
    batch_size: int = 8,
) -> DirectionRun:
    """Run the model with the activation at one token per prompt edited along each direction, layer by layer.

    Args:
        model: A ``TransformerBridge``.
        ids: Token ids of each prompt (BOS included where the model wants it); the logits read are at the
            last token.
        positions: The token each prompt's edit applies to (an index into its ``ids``).
        hook_names: One hook name per layer (``blocks.{l}.hook_resid_post``), the edit's site.
        directions: ``[layer, direction, d]`` directions per layer (normalised here to unit length).
        candidates: ``[n, cand]`` token ids whose logits are returned for each prompt.
        mode: ``"null"``, ``"set"`` or ``"add"`` (:func:`edit_along`).
        value: The ``set`` value or the ``add`` shift.
        batch_size: Sequences per forward (prompts x directions).

    Returns:
        The :class:`DirectionRun`.

    Raises:
        EntitylensError: Mismatched lengths, a position outside its prompt, a zero direction or a bad mode.
    """
    n = len(ids)
    if len(positions) != n or candidates.shape[0] != n:
        raise EntitylensError(f"{n} prompts but {len(positions)} positions and {candidates.shape[0]} candidate rows; "
                              "give one of each per prompt")
    if len(hook_names) != directions.shape[0]:
        raise EntitylensError(f"{len(hook_names)} hook names for {directions.shape[0]} layers of directions; "
                              "give one hook name per layer")
    if mode not in EDIT_MODES:
        raise EntitylensError(f"unknown edit mode {mode!r}; use one of {', '.join(EDIT_MODES)}")
    arrays = [np.asarray(x, dtype=np.int64) for x in ids]
    for i, (arr, p) in enumerate(zip(arrays, positions, strict=True)):
        if not 0 <= int(p) < len(arr):
            raise EntitylensError(f"prompt {i}: edit position {p} is outside its {len(arr)} tokens")
    norms = directions.norm(dim=-1, keepdim=True)
    if bool((norms == 0).any()):
        raise EntitylensError("a direction is all zeros; pass non-zero directions (e.g. a probe's weights)")
    units = (directions / norms).float()
    pad_id = pad_token_id(model.tokenizer)
    L, V = units.shape[0], units.shape[1]
    clean_logits = torch.cat([_forward(model, arrays[b: b + batch_size], pad_id, [])
                              for b in range(0, n, batch_size)])
    edited = torch.empty(L, V, n, candidates.shape[1])
    edited_lse = torch.empty(L, V, n)
    edited_top = torch.empty(L, V, n, dtype=torch.int64)
    pairs = [(i, v) for i in range(n) for v in range(V)]
    bar = progress(total=L * len(pairs), desc="direction edits", unit="seq")
    for li in range(L):
        for b0 in range(0, len(pairs), batch_size):
            chunk = pairs[b0: b0 + batch_size]
            out = _edited_forward(model, arrays, positions, chunk, hook_names[li], units[li], mode, value, pad_id)
            idx_i = torch.tensor([i for i, _ in chunk])
            idx_v = torch.tensor([v for _, v in chunk])
            edited[li, idx_v, idx_i] = out.gather(1, candidates[idx_i])
            edited_lse[li, idx_v, idx_i] = out.logsumexp(-1)
            edited_top[li, idx_v, idx_i] = out.argmax(-1)
            bar.update(len(chunk))
    bar.close()
    return DirectionRun(clean=clean_logits.gather(1, candidates), clean_lse=clean_logits.logsumexp(-1),
                        clean_top=clean_logits.argmax(-1), edited=edited, edited_lse=edited_lse,
                        edited_top=edited_top)
