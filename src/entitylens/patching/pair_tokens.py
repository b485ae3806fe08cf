"""Tokenising :class:`~entitylens.patching.text_pair.TextPair` s for a model into :class:`PatchPair` s.

Every role is placed on each side *by name*: prompts of different lengths (``drop_op``) stay aligned role by
role, and the tokenised pairs carry the tokenizer's fingerprint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from entitylens.activations.roles import find_roles, span_to_token, tokenize_with_offsets
from entitylens.errors import EntitylensError
from entitylens.models.tokens import model_prepends_bos
from entitylens.patching.text_pair import TextPair, validate_role_names
from entitylens.patching.types import PatchPair, tokenizer_fingerprint

__all__ = ["to_patch_pairs"]


def _tokenizer_of(model: Any) -> tuple[Any, bool]:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return model, False

    return tok, model_prepends_bos(model)


def to_patch_pairs(
    model: Any,
    pairs: Sequence[TextPair],
    *,
    roles: Sequence[str] | None = None,
    prepend_bos: bool | None = None,
) -> list[PatchPair]:
    """Tokenise text pairs for a model and place every role on each side by name.

    Prompts are tokenised as ``TransformerBridge.to_tokens`` does (BOS when the model prepends one), the
    answers through ``PatchPair.from_texts`` (their shared leading tokens, e.g. ``" the"``, are appended
    to both prompts and the first distinguishing tokens become the answer ids; the causal model's
    counterfactual answer, when the pair has one, becomes a token id at the same position). Catalogue roles are found
    in each prompt's own text (:func:`~entitylens.activations.roles.find_roles`), alias roles from their
    stored character spans; ``last`` is the scored position (the last token, after any appended answer
    prefix). Lengths may differ between the sides: alignment is by role name, never by raw position.

    Args:
        model: A ``TransformerBridge`` (its tokenizer and ``cfg.default_prepend_bos`` are used), or a
            tokenizer (then pass ``prepend_bos``; default no BOS).
        pairs: Text pairs.
        roles: Roles to place on every pair (default: each pair's own ``roles``). A requested role missing
            from a side of a pair is an error naming the pair.
        prepend_bos: Override the BOS choice.

    Returns:
        One :class:`PatchPair` per text pair, named like it, with the tokenizer fingerprint set.

    Raises:
        EntitylensError: a role missing from a side, answers without a distinguishing token, or a
            non-fast tokenizer.
    """
    tok, model_bos = _tokenizer_of(model)
    bos = model_bos if prepend_bos is None else bool(prepend_bos)
    fp = tokenizer_fingerprint(tok)
    wanted = None if roles is None else list(validate_role_names(roles))
    out = []
    for i, tp in enumerate(pairs):
        if not isinstance(tp, TextPair):
            raise EntitylensError(f"pairs[{i}] is a {type(tp).__name__}, not a TextPair; build it with build_pairs")
        names = list(tp.roles) if wanted is None else wanted
        try:
            base = PatchPair.from_texts(
                tok, tp.clean_prompt, tp.corrupted_prompt, tp.clean_answer, tp.corrupted_answer,
                bos=False, name=tp.name, counterfactual_answer=tp.counterfactual_answer,
            )  # fmt: skip
        except EntitylensError as e:
            raise EntitylensError(f"pair {i} ({tp.name}): {e}") from None
        sides = [
            _place_roles(tok, tp, i, side, text, toks, names, bos)
            for side, text, toks in (("clean", tp.clean_prompt, base.clean_tokens),
                                     ("corrupted", tp.corrupted_prompt, base.corrupted_tokens))
        ]  # fmt: skip
        (ct, cr), (xt, xr) = sides
        order = [r for r in names if r != "last"]
        out.append(
            PatchPair(
                clean_tokens=ct,
                corrupted_tokens=xt,
                clean_answer=base.clean_answer,
                corrupted_answer=base.corrupted_answer,
                clean_roles={r: cr[r] for r in order},
                corrupted_roles={r: xr[r] for r in order},
                tokenizer_fingerprint=fp,
                name=tp.name,
                counterfactual_answer=base.counterfactual_answer,
            )
        )
    return out


def _place_roles(
    tok: Any, tp: TextPair, i: int, side: str, text: str, toks: torch.Tensor, names: Sequence[str], bos: bool
) -> tuple[torch.Tensor, dict[str, int]]:
    """One side of pair ``i``: its token ids (BOS first when ``bos``) and the token position of every role.

    ``toks`` are the side's ids from ``PatchPair.from_texts`` (prompt, then the answers' shared leading tokens,
    no BOS); alias roles come from their character spans, catalogue roles from the prompt text.
    """
    ids, offsets = tokenize_with_offsets(tok, text, prepend_bos=bos)
    head = ids[1:] if bos else ids
    if toks[: len(head)].tolist() != head:  # pragma: no cover - tokenizer inconsistency guard
        raise EntitylensError(f"pair {i} ({tp.name}): the {side} prompt tokenises inconsistently; report this")
    positions: dict[str, int] = {}
    catalogue = [r for r in names if r != "last" and r not in tp.role_spans]
    for r in names:
        if r in tp.role_spans:
            span = tp.role_spans[r][0 if side == "clean" else 1]
            idx = span_to_token(offsets, span, "last")
            if idx is None:  # pragma: no cover - a non-empty span always overlaps a token
                raise EntitylensError(f"pair {i} ({tp.name}): role {r!r} has no token on the {side} side")
            positions[r] = idx
    if catalogue:
        try:
            found = find_roles(text, offsets, catalogue)
        except EntitylensError:
            missing = [r for r in catalogue if find_roles(text, offsets, [r], allow_missing=True)[r] is None]
            raise EntitylensError(
                f"pair {i} ({tp.name}): role {missing[0]!r} is missing from the {side} prompt; "
                f"drop it from the roles (--roles) or the pair from the file"
            ) from None
        positions.update({r: int(v) for r, v in found.items() if v is not None})
    return (torch.cat([torch.tensor(ids[:1]), toks]) if bos else toks), positions
