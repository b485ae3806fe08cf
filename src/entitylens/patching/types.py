"""The patching vocabulary: components, grids, hook names, and the :class:`PatchPair` / :class:`PatchResult` types.

A :class:`PatchPair` is the unit of work of every engine: a clean and a corrupted prompt (token ids, lengths
may differ), the answer position on each side, the first distinguishing token of each answer, and a
role -> position map for each side. A :class:`PatchResult` is the ``[pair, layer, cell]`` grid an engine
returns (and what ``result_<component>.safetensors`` stores). :func:`tokenizer_fingerprint` ties a pair to
the tokenizer that made its ids.
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from entitylens._io import atomic_write, sha256_json
from entitylens.errors import EntitylensError
from entitylens.models.tokens import prompt_ids

__all__ = [
    "COMPONENTS",
    "GRIDS",
    "PATH_FAST",
    "PATH_HOOKS",
    "Component",
    "Grid",
    "Method",
    "PatchPair",
    "PatchResult",
    "hook_name",
    "tokenizer_fingerprint",
]

Component = Literal["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head_z"]
Grid = Literal["layer_role", "layer_pos", "layer_head"]
Method = Literal["fast", "hooks"]

COMPONENTS: tuple[str, ...] = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head_z")
"""Patchable activations; bridge hook names are given by :func:`hook_name`."""

GRIDS: tuple[str, ...] = ("layer_role", "layer_pos", "layer_head")

_HOOK_TEMPLATES = {
    "resid_pre": "blocks.{}.hook_resid_pre",
    "resid_mid": "blocks.{}.hook_resid_mid",
    "resid_post": "blocks.{}.hook_resid_post",
    "attn_out": "blocks.{}.hook_attn_out",
    "mlp_out": "blocks.{}.hook_mlp_out",
    "head_z": "blocks.{}.attn.hook_z",
}

PATH_HOOKS = "bridge-hooks"
PATH_FAST = "hf-sdpa-causal-reuse"
"""``PatchResult.path`` of the fast engine (``hf-eager-causal-reuse`` when the twin runs eager attention)."""


def hook_name(component: str, layer: int) -> str:
    """The TransformerBridge hook name of ``component`` at ``layer`` (e.g. ``blocks.3.hook_resid_pre``)."""
    return _HOOK_TEMPLATES[component].format(layer)


# --------------------------------------------------------------------------------------------------
# Pairs
# --------------------------------------------------------------------------------------------------

_FINGERPRINTS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A stable SHA-256 of a tokenizer's vocabulary (token -> id) and special tokens.

    Two tokenizers with the same fingerprint map every string to the same ids, so pairs built with
    one can be run on a model that uses the other.
    """
    try:
        return _FINGERPRINTS[tokenizer]
    except (KeyError, TypeError):
        pass
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    special = sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []) or [])
    fp = sha256_json({"vocab": vocab, "special": special})
    try:
        _FINGERPRINTS[tokenizer] = fp
    except TypeError:
        pass
    return fp


def _as_tokens(x: Any, what: str) -> Tensor:
    t = torch.as_tensor(x)
    if t.ndim == 2 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 1 or t.numel() == 0:
        raise EntitylensError(
            f"PatchPair {what} must be a non-empty 1-D sequence of token ids, got shape "
            f"{tuple(t.shape)}; pass one prompt's ids, e.g. tokens[0]"
        )
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise EntitylensError(f"PatchPair {what} must hold integer token ids, got {t.dtype}; pass a LongTensor")
    if int(t.min()) < 0:
        raise EntitylensError(f"PatchPair {what} holds a negative token id; pass real token ids")
    return t.to(torch.long).detach().cpu().clone()


def _resolve_pos(pos: int, length: int, what: str) -> int:
    p = int(pos)
    q = p + length if p < 0 else p
    if not 0 <= q < length:
        raise EntitylensError(
            f"PatchPair {what}={p} is outside a prompt of {length} tokens; use a position in [-{length}, {length - 1}]"
        )
    return q


@dataclass(frozen=True, eq=False)
class PatchPair:
    """One clean/corrupted prompt pair for activation patching (independent of any dataset).

    Attributes:
        clean_tokens: Clean prompt token ids (1-D, BOS included if the model expects it).
        corrupted_tokens: Corrupted prompt token ids (1-D; its length may differ from the clean one).
        clean_answer: Token id of the clean answer's first token that differs from the corrupted answer.
        corrupted_answer: Token id of the corrupted answer's first distinguishing token; must differ from
            ``clean_answer``.
        clean_roles: Role name -> token position in the clean prompt (negative = from the end).
            ``"last"`` is always added (the last position) unless given.
        corrupted_roles: Role name -> position in the corrupted prompt; must name the same roles.
        clean_answer_pos: Position whose next-token logits are scored on the clean side (default: last).
        corrupted_answer_pos: The same on the corrupted side (default: last).
        tokenizer_fingerprint: :func:`tokenizer_fingerprint` of the tokenizer that made the ids, if known;
            :func:`patch_grid` refuses a model whose tokenizer has a different fingerprint.
        name: Free-form label (kept in results).
        counterfactual_answer: Token id, at ``corrupted_answer_pos``, of the task's causal-model answer to
            the corrupted prompt when the changed variable takes its clean value (what an interchange
            intervention should give; the clean answer when both sides query one box); ``None`` when the
            pair has none. Must differ from ``corrupted_answer``.

    Positions are normalised to non-negative ints and roles to read-only dicts in ``__post_init__``.
    """

    clean_tokens: Int[Tensor, " clean_pos"]
    corrupted_tokens: Int[Tensor, " corrupted_pos"]
    clean_answer: int
    corrupted_answer: int
    clean_roles: Mapping[str, int] = field(default_factory=dict)
    corrupted_roles: Mapping[str, int] = field(default_factory=dict)
    clean_answer_pos: int = -1
    corrupted_answer_pos: int = -1
    tokenizer_fingerprint: str | None = None
    name: str = ""
    counterfactual_answer: int | None = None

    def __post_init__(self) -> None:
        label = f" {self.name!r}" if self.name else ""
        clean = _as_tokens(self.clean_tokens, f"clean_tokens{label}")
        corr = _as_tokens(self.corrupted_tokens, f"corrupted_tokens{label}")
        object.__setattr__(self, "clean_tokens", clean)
        object.__setattr__(self, "corrupted_tokens", corr)
        try:
            ca, xa = int(self.clean_answer), int(self.corrupted_answer)
        except (TypeError, ValueError) as e:
            raise EntitylensError(
                f"PatchPair{label}: answers must be token ids (ints); pass the first "
                f"distinguishing token of each answer"
            ) from e
        if ca == xa:
            raise EntitylensError(
                f"PatchPair{label}: clean and corrupted answers are the same token ({ca}); "
                f"use the first token where the two answers differ, or drop this pair"
            )
        if ca < 0 or xa < 0:
            raise EntitylensError(f"PatchPair{label}: answer token ids must be non-negative; pass real ids")
        object.__setattr__(self, "clean_answer", ca)
        object.__setattr__(self, "corrupted_answer", xa)
        if self.counterfactual_answer is not None:
            cf = int(self.counterfactual_answer)
            if cf == xa or cf < 0:
                raise EntitylensError(f"PatchPair{label}: counterfactual_answer must be a token id other than the "
                                      f"corrupted answer's ({xa}); pass the causal model's answer token or None")
            object.__setattr__(self, "counterfactual_answer", cf)
        object.__setattr__(
            self, "clean_answer_pos", _resolve_pos(self.clean_answer_pos, len(clean), f"clean_answer_pos{label}")
        )
        object.__setattr__(
            self,
            "corrupted_answer_pos",
            _resolve_pos(self.corrupted_answer_pos, len(corr), f"corrupted_answer_pos{label}"),
        )
        c_roles = {str(k): int(v) for k, v in dict(self.clean_roles).items()}
        x_roles = {str(k): int(v) for k, v in dict(self.corrupted_roles).items()}
        c_roles.setdefault("last", -1)
        x_roles.setdefault("last", -1)
        missing_x = [r for r in c_roles if r not in x_roles]
        missing_c = [r for r in x_roles if r not in c_roles]
        if missing_x or missing_c:
            side, names = ("corrupted", missing_x) if missing_x else ("clean", missing_c)
            raise EntitylensError(
                f"PatchPair{label}: role(s) {names} missing from the {side} side; give every "
                f"role a position on both sides (clean_roles and corrupted_roles)"
            )
        c_roles = {k: _resolve_pos(v, len(clean), f"clean_roles[{k!r}]{label}") for k, v in c_roles.items()}
        x_roles = {k: _resolve_pos(v, len(corr), f"corrupted_roles[{k!r}]{label}") for k, v in x_roles.items()}
        object.__setattr__(self, "clean_roles", MappingProxyType(c_roles))
        object.__setattr__(self, "corrupted_roles", MappingProxyType(x_roles))

    @property
    def same_length(self) -> bool:
        """Whether clean and corrupted prompts have the same number of tokens (needed for layer_pos)."""
        return len(self.clean_tokens) == len(self.corrupted_tokens)

    @property
    def first_difference(self) -> int:
        """First position where the two prompts differ (the shorter length if one is a prefix of the other)."""
        n = min(len(self.clean_tokens), len(self.corrupted_tokens))
        diff = (self.clean_tokens[:n] != self.corrupted_tokens[:n]).nonzero()
        return int(diff[0, 0]) if len(diff) else n

    @classmethod
    def from_texts(
        cls,
        tokenizer: Any,
        clean_prompt: str,
        corrupted_prompt: str,
        clean_answer: str,
        corrupted_answer: str,
        *,
        clean_roles: Mapping[str, int] | None = None,
        corrupted_roles: Mapping[str, int] | None = None,
        bos: bool = True,
        name: str = "",
        counterfactual_answer: str | None = None,
    ) -> PatchPair:
        """Build a pair from text: the answers' shared leading tokens are appended to both prompts.

        ``" the map"`` vs ``" the car"`` after ``"... Box 2 contains"`` becomes prompts ending in
        ``" the"`` with answers ``" map"`` / ``" car"`` (their first distinguishing tokens).

        Args:
            tokenizer: A Hugging Face tokenizer (the model's).
            clean_prompt: Clean prompt text.
            corrupted_prompt: Corrupted prompt text.
            clean_answer: Clean continuation (tokenized on its own, so include its leading space).
            corrupted_answer: Corrupted continuation.
            counterfactual_answer: The causal model's answer to the corrupted prompt (see the attribute); it
                must part from the corrupted answer at the same token as the clean answer does.
            clean_roles: Role -> token position in the *final* clean ids (negative = from the end).
            corrupted_roles: The same for the corrupted ids.
            bos: Put the BOS id first (pass :func:`entitylens.models.model_prepends_bos` of the model).
            name: Label.

        Returns:
            The pair, with ``tokenizer_fingerprint`` set.
        """

        def ids(text: str, first: bool) -> list[int]:
            return prompt_ids(tokenizer, text, first)

        ca, xa = ids(clean_answer, False), ids(corrupted_answer, False)
        i = 0
        while i < min(len(ca), len(xa)) and ca[i] == xa[i]:
            i += 1
        if i == len(ca) or i == len(xa):
            raise EntitylensError(
                f"answers {clean_answer!r} and {corrupted_answer!r} have no distinguishing "
                f"token (one tokenizes as a prefix of the other); use answers that differ"
            )
        cf = None
        if counterfactual_answer is not None:
            fa = ids(counterfactual_answer, False)
            if fa == ca:
                cf = ca[i]
            elif len(fa) <= i or fa[:i] != xa[:i] or fa[i] == xa[i]:
                raise EntitylensError(
                    f"the counterfactual answer {counterfactual_answer!r} does not part from the corrupted answer "
                    f"{corrupted_answer!r} at the token where the clean answer {clean_answer!r} does; drop the pair"
                )
            else:
                cf = fa[i]
        return cls(
            clean_tokens=torch.tensor(ids(clean_prompt, bos) + ca[:i]),
            corrupted_tokens=torch.tensor(ids(corrupted_prompt, bos) + xa[:i]),
            clean_answer=ca[i],
            corrupted_answer=xa[i],
            clean_roles=dict(clean_roles or {}),
            corrupted_roles=dict(corrupted_roles or {}),
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
            name=name,
            counterfactual_answer=cf,
        )


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PatchResult:
    """A patching grid for several pairs.

    ``source`` is where patched activations come from and ``target`` the run they are patched into:
    clean -> corrupted for :func:`patch_grid` and attribution patching, model A -> model B for
    cross-model patching. Grids are ``[pair, layer, cell]``; cells outside a pair's prompt are ``nan``.

    Attributes:
        kind: ``"activation"``, ``"attribution"`` or ``"cross_model"``.
        component: Patched activation (one of :data:`COMPONENTS`).
        grid: ``"layer_role"``, ``"layer_pos"`` or ``"layer_head"``.
        path: Which engine produced the numbers (``"hf-sdpa-causal-reuse"``, ``"bridge-hooks"``,
            ``"bridge-grad"``).
        layers: Layer index of each grid row.
        cells: Label of each grid column (role name, position, or ``"H{h}"``).
        pair_names: ``PatchPair.name`` of each pair.
        normalised: ``(ld - target_ld) / (source_ld - target_ld)`` per cell.
        logit_diff: Raw logit difference per cell (for attribution: the first-order estimate).
        prob: Probability of the clean answer per cell (``None`` for attribution).
        top1: Whether the clean answer is top-1 per cell (``None`` for attribution).
        source_logit_diff: ``[pair]`` logit difference of the unpatched source run.
        target_logit_diff: ``[pair]`` logit difference of the unpatched target run.
        source_prob: ``[pair]`` clean-answer probability of the source run.
        target_prob: ``[pair]`` clean-answer probability of the target run.
        n_forward_cells: Cells that needed a forward (the rest were exact no-ops).
        n_noop_cells: Cells resolved without a forward.
    """

    kind: str
    component: str
    grid: str
    path: str
    layers: tuple[int, ...]
    cells: tuple[str, ...]
    pair_names: tuple[str, ...]
    normalised: Float[Tensor, "pair layer cell"]
    logit_diff: Float[Tensor, "pair layer cell"]
    prob: Float[Tensor, "pair layer cell"] | None
    top1: Bool[Tensor, "pair layer cell"] | None
    source_logit_diff: Float[Tensor, " pair"]
    target_logit_diff: Float[Tensor, " pair"]
    source_prob: Float[Tensor, " pair"]
    target_prob: Float[Tensor, " pair"]
    n_forward_cells: int = 0
    n_noop_cells: int = 0

    def mean(self) -> Float[Tensor, "layer cell"]:
        """Normalised metric averaged over pairs (ignoring ``nan`` cells)."""
        return self.normalised.nanmean(dim=0)

    def to_tensors(self) -> dict[str, Tensor]:
        """The tensors of this result by name (``prob``/``top1`` only when present)."""
        out = {
            "normalised": self.normalised,
            "logit_diff": self.logit_diff,
            "source_logit_diff": self.source_logit_diff,
            "target_logit_diff": self.target_logit_diff,
            "source_prob": self.source_prob,
            "target_prob": self.target_prob,
        }
        if self.prob is not None:
            out["prob"] = self.prob
        if self.top1 is not None:
            out["top1"] = self.top1.to(torch.uint8)
        return out

    def metadata(self) -> dict[str, Any]:
        """JSON-serialisable description (everything except the tensors)."""
        return {
            "kind": self.kind,
            "component": self.component,
            "grid": self.grid,
            "path": self.path,
            "layers": list(self.layers),
            "cells": list(self.cells),
            "pair_names": list(self.pair_names),
            "n_forward_cells": self.n_forward_cells,
            "n_noop_cells": self.n_noop_cells,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Atomically write the result as one ``.safetensors`` file (metadata in its header)."""
        from safetensors.torch import save

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.to_tensors().items()}
        blob = save(tensors, metadata={"entitylens_patch_result": json.dumps(self.metadata(), sort_keys=True)})
        with atomic_write(path, "wb") as f:
            f.write(blob)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PatchResult:
        """Read a result written by :meth:`save`."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["entitylens_patch_result"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise EntitylensError(
                f"{path} is not a patch result written by PatchResult.save; re-run the patching command to produce it"
            ) from e
        return cls(
            kind=meta["kind"],
            component=meta["component"],
            grid=meta["grid"],
            path=meta["path"],
            layers=tuple(meta["layers"]),
            cells=tuple(meta["cells"]),
            pair_names=tuple(meta["pair_names"]),
            normalised=tensors["normalised"],
            logit_diff=tensors["logit_diff"],
            prob=tensors.get("prob"),
            top1=None if "top1" not in tensors else tensors["top1"].bool(),
            source_logit_diff=tensors["source_logit_diff"],
            target_logit_diff=tensors["target_logit_diff"],
            source_prob=tensors["source_prob"],
            target_prob=tensors["target_prob"],
            n_forward_cells=int(meta["n_forward_cells"]),
            n_noop_cells=int(meta["n_noop_cells"]),
        )
