"""Exact activation patching over (layer x role), (layer x position) and (layer x head) grids.

The unit of work is a :class:`PatchPair`: a clean and a corrupted prompt (token ids, lengths may
differ), the answer position on each side, the first distinguishing token of the clean and of the
corrupted answer, and a role -> position map for each side ("query_box", "last", ...). For every
cell of a grid, :func:`patch_grid` copies one activation from the clean run into the corrupted run
and measures the logit difference at the answer position (see :mod:`entitylens.patching.metric`).

Two engines compute the same numbers:

``method="hooks"``
    A straightforward reference: ``run_with_hooks`` on the ``TransformerBridge``, many cells per
    forward (stacked along the batch dimension, each row with its own layer, positions and head).

``method="fast"`` (default)
    Causal reuse on the plain Hugging Face model inside the bridge (a parameter-sharing twin of
    ``bridge.original_model`` without the bridge's hook wrappers, SDPA attention). Three exact
    facts do the work:

    1. patching position ``p`` at layer ``l`` leaves every position ``< p`` unchanged at every layer,
       so the corrupted run's keys/values for positions ``< p`` are reused and only positions
       ``p..answer`` of layers ``>= l`` are recomputed;
    2. a cell whose clean and corrupted activations are provably identical (a shared token prefix
       of the same model, or bit-identical values) is a no-op: its result *is* the corrupted
       baseline, with no forward at all (the hooks engine skips these cells too);
    3. cells sharing a start position are stacked along the batch dimension; rows join the batch
       at their own layer.

    Supported: every family of the paper's registry -- Llama (Llama-2, Code Llama, Llemma, FLoat,
    DeepSeek), Mistral, Gemma / CodeGemma, Gemma-2/3 (sliding-window layers windowed by position,
    per-type rotary tables, normalised sublayer outputs) -- and Qwen2/3. Other architectures, TL-native
    bridges, and models whose twin does not reproduce the bridge's logits fall back to the hooks
    engine with a one-line warning that names the reason; ``PatchResult.path`` records which ran.

The bridge runs eager attention, the twin SDPA: residuals can differ by ~5e-4 in fp32, the
normalised metric by ~1e-5. Baselines always come from the same path as the patched runs.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import json
import math
import os
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from entitylens._io import atomic_write, sha256_json
from entitylens.errors import EntitylensError
from entitylens.models.tokens import prompt_ids
from entitylens.patching.metric import answer_metrics, normalise
from entitylens.progress import progress

__all__ = [
    "COMPONENTS",
    "GRIDS",
    "PatchPair",
    "PatchResult",
    "patch_grid",
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
        return cls(
            clean_tokens=torch.tensor(ids(clean_prompt, bos) + ca[:i]),
            corrupted_tokens=torch.tensor(ids(corrupted_prompt, bos) + xa[:i]),
            clean_answer=ca[i],
            corrupted_answer=xa[i],
            clean_roles=dict(clean_roles or {}),
            corrupted_roles=dict(corrupted_roles or {}),
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
            name=name,
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


# --------------------------------------------------------------------------------------------------
# Cells and jobs (internal)
# --------------------------------------------------------------------------------------------------


@dataclass
class _Cell:
    """One grid cell of one job: patch ``source[layer, src]`` into ``target[layer, dst]`` (head ``head``)."""

    li: int
    ci: int
    layer: int
    src: tuple[int, ...]
    dst: tuple[int, ...]
    head: int | None = None


@dataclass
class _Job:
    """One source run patched into one target run (a pair, or a prompt across two models)."""

    src_tokens: Tensor
    dst_tokens: Tensor
    src_answer_pos: int
    dst_answer_pos: int
    good: int
    bad: int
    cells: list[_Cell]
    same_model: bool
    name: str = ""

    @property
    def shared_prefix(self) -> int:
        """Positions < this hold provably identical activations on both sides (same model only)."""
        if not self.same_model:
            return 0
        n = min(len(self.src_tokens), len(self.dst_tokens))
        diff = (self.src_tokens[:n] != self.dst_tokens[:n]).nonzero()
        return int(diff[0, 0]) if len(diff) else n


@dataclass
class _Outcome:
    ld: Tensor
    prob: Tensor
    top1: Tensor
    src_ld: Tensor
    dst_ld: Tensor
    src_prob: Tensor
    dst_prob: Tensor
    n_forward: int
    n_noop: int


@dataclass
class _Capture:
    """Activations of one full run plus its answer metrics (all on the model's device)."""

    acts: dict[int, Tensor]  # layer -> [pos, ...] activation of the component
    ld: Tensor
    prob: Tensor
    top1: Tensor
    resid: list[Tensor] | None = None  # twin only: [pos, d_model] input of each layer (+ final)
    keys: list[Any] | None = None  # twin only: [1, kv_heads, pos, d_head] per layer
    values: list[Any] | None = None
    rope: dict[str, tuple[Tensor, Tensor]] | None = None  # twin only: rotary (cos, sin) per layer type
    pre: dict[int, Tensor] | None = None  # hooks engine, resid_mid only: resid_pre per layer


def _metrics_row(logits: Tensor, good: int, bad: int) -> tuple[Tensor, Tensor, Tensor]:
    ld, prob, top1 = answer_metrics(logits[None], good, bad)
    return ld[0], prob[0], top1[0]


# --------------------------------------------------------------------------------------------------
# Hooks engine (reference): run_with_hooks on the bridge, cells stacked along the batch dimension
# --------------------------------------------------------------------------------------------------


class _HookRunner:
    path = PATH_HOOKS

    def __init__(self, bridge: Any) -> None:
        self.bridge = bridge
        self.n_layers = int(bridge.cfg.n_layers)
        self.d_vocab = int(bridge.cfg.d_vocab)

    @property
    def device(self) -> torch.device:
        return next(self.bridge.parameters()).device

    def capture(
        self, tokens: Tensor, component: str, layers: Sequence[int], answer_pos: int, good: int, bad: int
    ) -> _Capture:
        names = {hook_name(component, layer): layer for layer in layers}
        pre = {hook_name("resid_pre", layer): layer for layer in layers} if component == "resid_mid" else {}
        with torch.no_grad():
            logits, cache = self.bridge.run_with_cache(
                tokens[None].to(self.device), names_filter=lambda n: n in names or n in pre
            )
        acts = {layer: cache[name][0].detach() for name, layer in names.items()}
        ld, prob, top1 = _metrics_row(logits[0, answer_pos], good, bad)
        cap = _Capture(acts=acts, ld=ld, prob=prob, top1=top1)
        if pre:
            cap.pre = {layer: cache[name][0].detach() for name, layer in pre.items()}
        return cap

    def run_cells(
        self,
        job: _Job,
        src: _Capture,
        dst: _Capture,
        component: str,
        cells: Sequence[_Cell],
        batch_cells: int,
        out: tuple[Tensor, Tensor, Tensor],
        desc: str,
    ) -> None:
        if not cells:
            return
        dev = self.device
        tokens = job.dst_tokens.to(dev)
        n_pos = len(tokens)
        # Logits of every row and position are materialised: cap rows at ~512 MiB of fp32 logits.
        cap = max(1, min(batch_cells, (1 << 27) // max(1, n_pos * self.d_vocab)))
        batches = [cells[i : i + cap] for i in range(0, len(cells), cap)]
        for batch in progress(batches, desc=desc, unit="batch", leave=False):
            by_layer: dict[int, list[tuple[int, int, int, int | None]]] = {}
            for row, cell in enumerate(batch):
                for sp, dp in zip(cell.src, cell.dst):
                    by_layer.setdefault(cell.layer, []).append((row, sp, dp, cell.head))
            if component == "resid_mid":
                # The bridge's hook_resid_mid aliases ln2.hook_in: a value returned there feeds the MLP but
                # not the residual stream. Patch the stream itself: set attn_out to (source mid - target pre).
                hooks = [
                    (hook_name("attn_out", layer), _make_setter(entries, src.acts[layer], dst.pre[layer]))
                    for layer, entries in by_layer.items()
                ]
            else:
                hooks = [
                    (hook_name(component, layer), _make_setter(entries, src.acts[layer]))
                    for layer, entries in by_layer.items()
                ]
            with torch.no_grad():
                logits = self.bridge.run_with_hooks(tokens[None].expand(len(batch), n_pos), fwd_hooks=hooks)
            ld, prob, top1 = answer_metrics(logits[:, job.dst_answer_pos], job.good, job.bad)
            li = torch.tensor([c.li for c in batch], device=ld.device)
            ci = torch.tensor([c.ci for c in batch], device=ld.device)
            out[0][li, ci], out[1][li, ci], out[2][li, ci] = ld, prob, top1


def _make_setter(
    entries: list[tuple[int, int, int, int | None]], source: Tensor, minus: Tensor | None = None
) -> Callable[..., Tensor]:
    """A bridge hook writing ``source[src_pos(, head)]`` (minus ``minus[dst_pos]``) into rows/positions(/heads)."""
    dev = source.device
    rows = torch.tensor([e[0] for e in entries], device=dev)
    sps = torch.tensor([e[1] for e in entries], device=dev)
    dps = torch.tensor([e[2] for e in entries], device=dev)
    if entries[0][3] is None:
        values = source[sps] if minus is None else source[sps] - minus[dps]

        def hook(act: Tensor, hook: Any) -> Tensor:
            act = act.clone()
            act[rows, dps] = values.to(act.dtype)
            return act
    else:
        heads = torch.tensor([e[3] for e in entries], device=dev)
        values = source[sps, heads]

        def hook(act: Tensor, hook: Any) -> Tensor:
            act = act.clone()
            act[rows, dps, heads] = values.to(act.dtype)
            return act

    return hook


# --------------------------------------------------------------------------------------------------
# Fast engine: a plain HF twin of bridge.original_model with causal K/V reuse
# --------------------------------------------------------------------------------------------------

_FAST_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"})
"""Hugging Face ``model_type`` values the fast engine runs: every family of the paper's registry (Llama-2,
Code Llama, Llemma, FLoat and DeepSeek are ``llama``; Mistral; Gemma / CodeGemma; Gemma-2/3, with their
sliding-window layers) plus Qwen2/3."""

MIX_START_POSITIONS: bool | None = None
"""Stack cells with different start positions in one batch (each row keeps its own patched positions; the
batch recomputes from the smallest). ``None``: only on accelerators -- a CPU is FLOP-bound, so there cells are
grouped by exact start position."""

TWIN_ATTN_IMPLEMENTATION = "sdpa"
"""Attention kernel of the fast engine's twin (``"sdpa"``; ``"eager"`` matches the bridge bit-for-bit-ish)."""


class _Unsupported(Exception):
    """The fast engine cannot run this model (the caller falls back to hooks)."""


class _CaptureKV:
    """Stand-in for an HF cache during a full run: records each layer's (rotated) keys and values."""

    def __init__(self, n_layers: int) -> None:
        self.keys: list[Tensor | None] = [None] * n_layers
        self.values: list[Tensor | None] = [None] * n_layers

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value


class _PrefixKV:
    """Stand-in for an HF cache during a chunk run: prepends the target run's keys/values for positions < s."""

    def __init__(self, keys: list[Tensor], values: list[Tensor], start: int) -> None:
        self.keys, self.values, self.start = keys, values, start

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if self.start == 0:
            return key, value
        b = key.shape[0]
        pk = self.keys[layer_idx][:, :, : self.start].expand(b, -1, -1, -1)
        pv = self.values[layer_idx][:, :, : self.start].expand(b, -1, -1, -1)
        return torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)


def _build_twin(bridge: Any, attn_implementation: str) -> Any:
    """A plain HF model sharing every parameter/buffer with ``bridge.original_model`` (no bridge wrappers)."""
    from transformers import PreTrainedModel

    hf = getattr(bridge, "original_model", None)
    if not isinstance(hf, PreTrainedModel):
        raise _Unsupported("the bridge does not wrap a Hugging Face PreTrainedModel")
    cfg = copy.deepcopy(hf.config)
    if getattr(cfg, "model_type", None) not in _FAST_MODEL_TYPES:
        raise _Unsupported(f"model_type {getattr(cfg, 'model_type', None)!r} is not in {sorted(_FAST_MODEL_TYPES)}")
    if any(t not in ("full_attention", "sliding_attention") for t in (getattr(cfg, "layer_types", None) or [])):
        raise _Unsupported(f"the model has attention layers of types {sorted(set(cfg.layer_types))}")
    with torch.device("meta"):
        twin = type(hf)._from_config(cfg, attn_implementation=attn_implementation)
    orig: dict[str, Tensor] = {}
    for name, t in itertools.chain(
        hf.named_parameters(remove_duplicate=False), hf.named_buffers(remove_duplicate=False)
    ):
        orig.setdefault(name.replace("._original_component", ""), t)
    for name, _ in itertools.chain(
        list(twin.named_parameters(remove_duplicate=False)), list(twin.named_buffers(remove_duplicate=False))
    ):
        if name not in orig:
            raise _Unsupported(f"no tensor for {name} in the bridge's model")
        mod_name, _, attr = name.rpartition(".")
        mod = twin.get_submodule(mod_name) if mod_name else twin
        if attr in mod._parameters:
            t = orig[name]
            mod._parameters[attr] = t if isinstance(t, torch.nn.Parameter) else torch.nn.Parameter(t, False)
        else:
            mod._buffers[attr] = orig[name]
    if any(t.is_meta for t in itertools.chain(twin.parameters(), twin.buffers())):
        raise _Unsupported("some tensors could not be shared with the bridge")
    if len({t.device for t in twin.parameters()}) > 1:
        raise _Unsupported("the model is spread over several devices")
    inner = getattr(twin, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, a) for a in needed) or not hasattr(twin, "lm_head"):
        raise _Unsupported("unexpected module layout")
    for layer in inner.layers:
        if not (hasattr(layer, "self_attn") and hasattr(layer, "mlp") and hasattr(layer.self_attn, "o_proj")):
            raise _Unsupported("unexpected decoder-layer layout")
    twin.eval()
    return twin


class _TwinRunner:
    def __init__(self, bridge: Any) -> None:
        self.bridge = bridge
        self.attn_implementation = TWIN_ATTN_IMPLEMENTATION
        self.path = f"hf-{self.attn_implementation}-causal-reuse"
        self.twin = _build_twin(bridge, self.attn_implementation)
        self.inner = self.twin.model
        self.layers = list(self.inner.layers)
        self.n_layers = len(self.layers)
        cfg = self.twin.config
        self.n_heads = int(cfg.num_attention_heads)
        self.d_head = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        window = getattr(cfg, "sliding_window", None)
        types = list(getattr(cfg, "layer_types", None) or [])
        if not types:  # Mistral-style: every layer slides when sliding_window is set
            types = ["sliding_attention" if window else "full_attention"] * self.n_layers
        self.layer_types: list[str] = types[: self.n_layers]
        self.sliding_window: int | None = int(window) if window and "sliding_attention" in types else None
        # Rotary tables per layer type (Gemma-3's local and global layers use different bases).
        self.rope_by_type = "layer_type" in inspect.signature(self.inner.rotary_emb.forward).parameters
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        # Gemma-2/3 normalise the attention output before adding it to the residual stream.
        self.post_attn_norm = all(hasattr(layer, "pre_feedforward_layernorm") for layer in self.layers)

    @property
    def device(self) -> torch.device:
        return next(self.twin.parameters()).device

    def mask(self, start: int, end: int, dtype: torch.dtype, sliding: bool = False) -> Tensor | None:
        """Additive causal mask for queries ``start..end`` over keys ``0..end`` (``None`` when not needed).

        With ``sliding`` a key is also hidden once it is ``sliding_window`` or more positions back (the rule
        of Hugging Face's sliding-window layers).
        """
        n = end - start + 1
        slides = sliding and self.sliding_window is not None and end + 1 > self.sliding_window
        if not slides and (n == 1 or (start == 0 and self.attn_implementation == "sdpa")):
            return None  # a single query sees every key; SDPA applies is_causal itself from position 0
        q = torch.arange(start, end + 1, device=self.device)[:, None]
        k = torch.arange(0, end + 1, device=self.device)[None, :]
        allowed = k <= q
        if slides:
            allowed = allowed & (q - k < int(self.sliding_window))  # type: ignore[arg-type]
        zero = torch.zeros((), dtype=dtype, device=self.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)[None, None]

    def masks(self, start: int, end: int, dtype: torch.dtype) -> list[Tensor | None]:
        """The mask of every layer (sliding layers get the windowed one)."""
        by_type = {t: self.mask(start, end, dtype, t == "sliding_attention") for t in set(self.layer_types)}
        return [by_type[t] for t in self.layer_types]

    def rope(self, hidden: Tensor, pos_ids: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """Rotary (cos, sin) per layer type."""
        if not self.rope_by_type:
            table = self.inner.rotary_emb(hidden, pos_ids)
            return {t: table for t in set(self.layer_types)}
        return {t: self.inner.rotary_emb(hidden, pos_ids, t) for t in set(self.layer_types)}

    def logits(self, hidden: Tensor) -> Tensor:
        """Final norm, unembedding and (Gemma-2) logit soft-capping."""
        out = self.twin.lm_head(self.inner.norm(hidden))
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    def attn_to_resid(self, layer: Any) -> Any:
        """The module whose output attention adds to the residual stream (``attn_out``, as TransformerLens)."""
        return layer.post_attention_layernorm if self.post_attn_norm else layer.self_attn

    def mlp_to_resid(self, layer: Any) -> Any:
        """The module whose output the MLP adds to the residual stream (``mlp_out``)."""
        return layer.post_feedforward_layernorm if self.post_attn_norm else layer.mlp

    def check_length(self, n_pos: int) -> None:
        """Nothing to check: sliding windows are applied by :meth:`mask`."""

    def _hooks_for_capture(self, component: str, store: dict[int, Tensor]) -> list[Any]:
        handles = []
        for j, layer in enumerate(self.layers):
            if component in ("attn_out", "resid_mid"):
                handles.append(
                    self.attn_to_resid(layer).register_forward_hook(
                        lambda m, a, o, j=j: store.__setitem__(j, _layer_out(o)[0].detach())
                    )
                )
            elif component == "mlp_out":
                handles.append(
                    self.mlp_to_resid(layer).register_forward_hook(
                        lambda m, a, o, j=j: store.__setitem__(j, o[0].detach())
                    )
                )
            elif component == "head_z":
                handles.append(
                    layer.self_attn.o_proj.register_forward_pre_hook(
                        lambda m, a, j=j: store.__setitem__(
                            j, a[0][0].detach().reshape(a[0].shape[1], self.n_heads, self.d_head).clone()
                        )
                    )
                )
        return handles

    def capture(
        self, tokens: Tensor, component: str, layers: Sequence[int], answer_pos: int, good: int, bad: int
    ) -> _Capture:
        """One full run: per-layer residuals, keys/values, the component's activations, answer metrics."""
        self.check_length(len(tokens))
        dev = self.device
        ids = tokens[None].to(dev)
        n_pos = ids.shape[1]
        store: dict[int, Tensor] = {}
        kv = _CaptureKV(self.n_layers)
        handles = self._hooks_for_capture(component, store)
        try:
            with torch.no_grad():
                hidden = self.inner.embed_tokens(ids)
                pos_ids = torch.arange(n_pos, device=dev)[None]
                rope = self.rope(hidden, pos_ids)
                resid = []
                masks = self.masks(0, n_pos - 1, hidden.dtype)
                for j, layer in enumerate(self.layers):
                    resid.append(hidden[0])
                    hidden = _layer_out(
                        layer(
                            hidden,
                            attention_mask=masks[j],
                            position_ids=pos_ids,
                            past_key_values=kv,
                            use_cache=True,
                            position_embeddings=rope[self.layer_types[j]],
                        )
                    )
                resid.append(hidden[0])
                logits = self.logits(hidden[:, answer_pos])[0]
        finally:
            for h in handles:
                h.remove()
        if component == "resid_pre":
            acts = {j: resid[j] for j in layers}
        elif component == "resid_post":
            acts = {j: resid[j + 1] for j in layers}
        elif component == "resid_mid":
            acts = {j: resid[j] + store[j] for j in layers}  # store: what attention adds to the stream
        else:
            acts = {j: store[j] for j in layers}
        ld, prob, top1 = _metrics_row(logits, good, bad)
        return _Capture(
            acts=acts,
            ld=ld,
            prob=prob,
            top1=top1,
            resid=resid,
            keys=kv.keys,
            values=kv.values,
            rope=rope,
        )

    def verify(self, tokens: Tensor, answer_pos: int, capture_logits_fn: Callable[[], Tensor]) -> float:
        """Max |twin - bridge| over the answer-position logits, relative to max(1, max |logit|)."""
        with torch.no_grad():
            ref = self.bridge(tokens[None].to(self.device))[0, answer_pos].float()
            ours = capture_logits_fn().float()
        return float((ref - ours).abs().max() / ref.abs().max().clamp_min(1.0))

    def answer_logits(self, tokens: Tensor, answer_pos: int) -> Tensor:
        dev = self.device
        ids = tokens[None].to(dev)
        with torch.no_grad():
            hidden = self.inner.embed_tokens(ids)
            pos_ids = torch.arange(ids.shape[1], device=dev)[None]
            rope = self.rope(hidden, pos_ids)
            masks = self.masks(0, ids.shape[1] - 1, hidden.dtype)
            for j, layer in enumerate(self.layers):
                hidden = _layer_out(
                    layer(
                        hidden,
                        attention_mask=masks[j],
                        position_ids=pos_ids,
                        past_key_values=None,
                        use_cache=False,
                        position_embeddings=rope[self.layer_types[j]],
                    )
                )
            return self.logits(hidden[:, answer_pos])[0]

    def run_cells(
        self,
        job: _Job,
        src: _Capture,
        dst: _Capture,
        component: str,
        cells: Sequence[_Cell],
        batch_cells: int,
        out: tuple[Tensor, Tensor, Tensor],
        desc: str,
    ) -> None:
        if not cells:
            return
        a = job.dst_answer_pos
        mix = self.device.type != "cpu" if MIX_START_POSITIONS is None else MIX_START_POSITIONS
        batches = _fast_batches(cells, component, batch_cells, mix, self.n_layers)
        for batch in progress(batches, desc=desc, unit="batch", leave=False):
            self._run_batch(job, src, dst, component, batch, a, out)

    def _run_batch(
        self,
        job: _Job,
        src: _Capture,
        dst: _Capture,
        component: str,
        batch: list[_Cell],
        a: int,
        out: tuple[Tensor, Tensor, Tensor],
    ) -> None:
        assert dst.resid is not None and dst.keys is not None and dst.values is not None
        assert dst.rope is not None
        dev = self.device
        start = min(min(c.dst) for c in batch)
        n = a - start + 1
        pos_ids = torch.arange(start, a + 1, device=dev)[None]
        rope = {t: (cos[:, start : a + 1], sin[:, start : a + 1]) for t, (cos, sin) in dst.rope.items()}
        masks = self.masks(start, a, dst.resid[0].dtype)
        cache = _PrefixKV(dst.keys, dst.values, start)  # type: ignore[arg-type]
        joins: dict[int, list[_Cell]] = {}
        for c in batch:
            joins.setdefault(_join_layer(component, c.layer), []).append(c)
        order: list[_Cell] = []
        hidden: Tensor | None = None
        with torch.no_grad():
            for j in range(min(joins), self.n_layers + 1):
                new = joins.get(j, [])
                offset = 0 if hidden is None else hidden.shape[0]
                if new:
                    h_new = dst.resid[j][start : a + 1][None].expand(len(new), n, -1).clone()
                    if component in ("resid_pre", "resid_post"):
                        for r, c in enumerate(new):
                            for sp, dp in zip(c.src, c.dst):
                                h_new[r, dp - start] = src.acts[c.layer][sp]
                    hidden = h_new if hidden is None else torch.cat([hidden, h_new], dim=0)
                    order.extend(new)
                if j == self.n_layers:
                    break
                assert hidden is not None
                handle = None
                if new and component not in ("resid_pre", "resid_post"):
                    handle = self._in_layer_patch(component, j, new, offset, start, src, dst)
                try:
                    hidden = _layer_out(
                        self.layers[j](
                            hidden,
                            attention_mask=masks[j],
                            position_ids=pos_ids,
                            past_key_values=cache,
                            use_cache=True,
                            position_embeddings=rope[self.layer_types[j]],
                        )
                    )
                finally:
                    if handle is not None:
                        handle.remove()
            assert hidden is not None
            logits = self.logits(hidden[:, -1])
        ld, prob, top1 = answer_metrics(logits, job.good, job.bad)
        li = torch.tensor([c.li for c in order], device=ld.device)
        ci = torch.tensor([c.ci for c in order], device=ld.device)
        out[0][li, ci], out[1][li, ci], out[2][li, ci] = ld, prob, top1

    def _in_layer_patch(
        self, component: str, j: int, new: list[_Cell], offset: int, start: int, src: _Capture, dst: _Capture
    ) -> Any:
        rows, idx, heads, vals = [], [], [], []
        for r, c in enumerate(new):
            for sp, dp in zip(c.src, c.dst):
                rows.append(offset + r)
                idx.append(dp - start)
                heads.append(c.head)
                v = src.acts[j][sp]
                if component == "resid_mid":
                    assert dst.resid is not None
                    v = v - dst.resid[j][dp]  # attn_out that turns this row's resid_mid into the source's
                vals.append(v if c.head is None else v[c.head])
        dev = self.device
        rows_t, idx_t = torch.tensor(rows, device=dev), torch.tensor(idx, device=dev)
        vals_t = torch.stack(vals)
        layer = self.layers[j]
        if component in ("attn_out", "resid_mid", "mlp_out"):
            # What the sublayer adds to the residual stream (Gemma-2/3: after its output norm).
            target = self.mlp_to_resid(layer) if component == "mlp_out" else self.attn_to_resid(layer)

            def set_hook(m: Any, args: Any, output: Any) -> Any:
                _layer_out(output)[rows_t, idx_t] = vals_t.to(_layer_out(output).dtype)
                return output

            return target.register_forward_hook(set_hook)
        heads_t = torch.tensor(heads, device=dev)
        n_heads, d_head = self.n_heads, self.d_head

        def z_hook(m: Any, args: Any) -> Any:
            x = args[0]
            z = x.reshape(x.shape[0], x.shape[1], n_heads, d_head).clone()
            z[rows_t, idx_t, heads_t] = vals_t.to(z.dtype)
            return (z.reshape(x.shape),) + tuple(args[1:])

        return layer.self_attn.o_proj.register_forward_pre_hook(z_hook)


def _layer_out(x: Any) -> Tensor:
    return x[0] if isinstance(x, tuple) else x


def _join_layer(component: str, layer: int) -> int:
    """First layer the fast engine must recompute for a cell at ``layer``."""
    return layer + 1 if component == "resid_post" else layer


def _fast_batches(
    cells: Sequence[_Cell], component: str, batch_cells: int, mix: bool, n_layers: int
) -> list[list[_Cell]]:
    """Group cells by start position (exact FLOPs on CPU); on accelerators also merge neighbours."""
    ordered = sorted(cells, key=lambda c: (min(c.dst), _join_layer(component, c.layer), c.li, c.ci))
    batches: list[list[_Cell]] = []
    for c in ordered:
        if batches and len(batches[-1]) < batch_cells and (mix or min(batches[-1][0].dst) == min(c.dst)):
            batches[-1].append(c)
        else:
            batches.append([c])
    return batches


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def _check_model(model: Any, what: str = "model") -> None:
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(model, "run_with_hooks") or not hasattr(cfg, "n_layers"):
        raise EntitylensError(
            f"{what} must be a transformer_lens TransformerBridge, got {type(model).__name__}; "
            f"load it with entitylens.models.load_model"
        )


def _check_component_grid(component: str, grid: str, method: str) -> None:
    if component not in COMPONENTS:
        raise EntitylensError(f"unknown component {component!r}; use one of {', '.join(COMPONENTS)}")
    if grid not in GRIDS:
        raise EntitylensError(f"unknown grid {grid!r}; use one of {', '.join(GRIDS)}")
    if (component == "head_z") != (grid == "layer_head"):
        fix = "use grid='layer_head'" if component == "head_z" else "use component='head_z'"
        raise EntitylensError(f"component {component!r} does not go with grid {grid!r}; {fix}")
    if method not in ("fast", "hooks"):
        raise EntitylensError(f"unknown method {method!r}; use 'fast' or 'hooks'")


def _check_tokens(model: Any, pairs: Sequence[PatchPair]) -> None:
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


def _resolve_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
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


def _resolve_roles(roles: Sequence[str] | None, pairs: Sequence[PatchPair]) -> list[str]:
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


def _grid_columns(
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
        names = _resolve_roles(roles, pairs)
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
            cols = []
            for ci, x in enumerate(wanted):
                q = x + n if x < 0 else x
                if 0 <= q < n:
                    cols.append((ci, (q,), (q,), None))
            per_pair.append(cols)
        return names, per_pair
    # layer_head
    names = [f"H{h}" for h in range(n_heads)]
    role_names = None if roles is None else _resolve_roles(roles, pairs)
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


def _fallback_message(reason: Exception) -> str:
    return f"fast patching unavailable ({reason}); using the bridge-hooks engine (same numbers, slower)"


def _make_runner(model: Any, method: str) -> _HookRunner | _TwinRunner:
    if method == "hooks":
        return _HookRunner(model)
    try:
        return _TwinRunner(model)
    except _Unsupported as e:
        warnings.warn(_fallback_message(e), stacklevel=3)
        return _HookRunner(model)


def _verify_twin(runner: _TwinRunner, tokens: Tensor, answer_pos: int) -> bool:
    """Check that the twin reproduces the bridge's answer logits (relative error; looser for 16-bit floats)."""
    dtype = next(runner.twin.parameters()).dtype
    tol = 2e-3 if torch.finfo(dtype).bits >= 32 else 3e-2
    err = runner.verify(tokens, answer_pos, lambda: runner.answer_logits(tokens, answer_pos))
    if not math.isfinite(err) or err > tol:
        warnings.warn(
            f"the fast engine's model does not reproduce the bridge (relative logit error {err:.2e});"
            f" using the bridge-hooks engine",
            stacklevel=3,
        )
        return False
    return True


def _filter_fast(job: _Job, cells: list[_Cell], src: _Capture, dst: _Capture) -> tuple[list[_Cell], list[_Cell]]:
    """Split cells into (need a forward, exact no-op) and drop no-op entries inside multi-position cells.

    An entry ``(layer, src pos, dst pos)`` is a no-op when the destination is after the answer position,
    when both sides share the token prefix up to it (same model, same position), or when the source and
    destination activations are bit-identical.
    """
    a = job.dst_answer_pos
    prefix = job.shared_prefix
    flat: list[tuple[int, int, int, int, int | None]] = []  # (cell idx, layer, sp, dp, head)
    for k, c in enumerate(cells):
        for sp, dp in zip(c.src, c.dst):
            if dp > a or (sp == dp and dp < prefix):
                continue
            flat.append((k, c.layer, sp, dp, c.head))
    keep: dict[int, list[tuple[int, int]]] = {}
    if flat:
        # One vectorised equality test for all remaining entries (a single device sync per job).
        eq = _entries_equal(flat, src.acts, dst.acts)
        for (k, _, sp, dp, _), same in zip(flat, eq):
            if not same:
                keep.setdefault(k, []).append((sp, dp))
    run, noop = [], []
    for k, c in enumerate(cells):
        if k in keep:
            sps, dps = zip(*keep[k])
            run.append(_Cell(c.li, c.ci, c.layer, tuple(sps), tuple(dps), c.head))
        else:
            noop.append(c)
    return run, noop


def _entries_equal(
    flat: list[tuple[int, int, int, int, int | None]], src_acts: dict[int, Tensor], dst_acts: dict[int, Tensor]
) -> list[bool]:
    out: list[bool] = []
    by_layer: dict[int, list[int]] = {}
    for i, e in enumerate(flat):
        by_layer.setdefault(e[1], []).append(i)
    res = torch.zeros(len(flat), dtype=torch.bool)
    parts = []
    for layer, ids in by_layer.items():
        dev = src_acts[layer].device
        sp = torch.tensor([flat[i][2] for i in ids], device=dev)
        dp = torch.tensor([flat[i][3] for i in ids], device=dev)
        if flat[ids[0]][4] is None:
            s, d = src_acts[layer][sp], dst_acts[layer][dp]
        else:
            h = torch.tensor([flat[i][4] for i in ids], device=dev)
            s, d = src_acts[layer][sp, h], dst_acts[layer][dp, h]
        parts.append((ids, (s == d).flatten(1).all(dim=1)))
    for ids, eq in parts:
        res[torch.tensor(ids)] = eq.cpu()
    out = res.tolist()
    return out


def _run_jobs(
    src_runner: _HookRunner | _TwinRunner,
    dst_runner: _HookRunner | _TwinRunner,
    jobs: Sequence[_Job],
    component: str,
    layers: Sequence[int],
    n_cols: int,
    batch_cells: int,
    skip_noop_cells: bool,
    desc: str,
) -> _Outcome:
    n_l = len(layers)
    lds, probs, top1s, s_ld, d_ld, s_pr, d_pr = [], [], [], [], [], [], []
    n_forward = n_noop = 0
    for jn, job in enumerate(progress(jobs, desc=desc, unit="pair")):
        src = src_runner.capture(job.src_tokens, component, layers, job.src_answer_pos, job.good, job.bad)
        dst = dst_runner.capture(job.dst_tokens, component, layers, job.dst_answer_pos, job.good, job.bad)
        dev = dst.ld.device
        ld = torch.full((n_l, n_cols), float("nan"), device=dev)
        prob = torch.full((n_l, n_cols), float("nan"), device=dev)
        top1 = torch.zeros((n_l, n_cols), dtype=torch.bool, device=dev)
        if skip_noop_cells:
            run, noop = _filter_fast(job, job.cells, src, dst)
        else:
            run, noop = list(job.cells), []
        if noop:
            li = torch.tensor([c.li for c in noop], device=dev)
            ci = torch.tensor([c.ci for c in noop], device=dev)
            ld[li, ci], prob[li, ci], top1[li, ci] = dst.ld, dst.prob, dst.top1
        dst_runner.run_cells(job, src, dst, component, run, batch_cells, (ld, prob, top1), f"pair {jn}")
        n_forward += len(run)
        n_noop += len(noop)
        lds.append(ld)
        probs.append(prob)
        top1s.append(top1)
        s_ld.append(src.ld)
        d_ld.append(dst.ld)
        s_pr.append(src.prob)
        d_pr.append(dst.prob)
    return _Outcome(
        ld=torch.stack(lds).float().cpu(),
        prob=torch.stack(probs).float().cpu(),
        top1=torch.stack(top1s).cpu(),
        src_ld=torch.stack(s_ld).float().cpu(),
        dst_ld=torch.stack(d_ld).float().cpu(),
        src_prob=torch.stack(s_pr).float().cpu(),
        dst_prob=torch.stack(d_pr).float().cpu(),
        n_forward=n_forward,
        n_noop=n_noop,
    )


def _check_batch_cells(batch_cells: int) -> int:
    if isinstance(batch_cells, bool) or not isinstance(batch_cells, int) or batch_cells < 1:
        raise EntitylensError(f"batch_cells must be a positive int, got {batch_cells!r}; e.g. batch_cells=32")
    return batch_cells


def _pairs_list(pairs: PatchPair | Sequence[PatchPair]) -> list[PatchPair]:
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


def patch_grid(
    model: Any,
    pairs: PatchPair | Sequence[PatchPair],
    component: Component = "resid_pre",
    grid: Grid = "layer_role",
    *,
    roles: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    batch_cells: int = 32,
    method: Method = "fast",
    skip_noop_cells: bool = True,
) -> PatchResult:
    """Exact activation patching: clean -> corrupted for every cell of a (layer x role|pos|head) grid.

    Args:
        model: A ``TransformerBridge``.
        pairs: One or more :class:`PatchPair`.
        component: ``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out`` (position grids)
            or ``head_z`` (the ``layer_head`` grid).
        grid: ``"layer_role"`` (clean role position -> corrupted role position; lengths may differ),
            ``"layer_pos"`` (same position on both sides; needs equal lengths; TransformerLens's
            ``get_act_patch_*`` layout) or ``"layer_head"`` (one head's ``z`` at every position, or at the
            positions of ``roles`` when given).
        roles: Roles forming the columns (layer_role) or the patched positions (layer_head). Default:
            the roles every pair has, ``"last"`` at the end.
        layers: Grid rows (default: every layer); negative = from the end.
        positions: Columns of a layer_pos grid (default ``0..max_len-1``); negative = from each pair's end.
        batch_cells: Most cells stacked into one forward.
        method: ``"fast"`` (causal reuse on the HF twin, falls back to hooks when unsupported) or ``"hooks"``.
        skip_noop_cells: Resolve provable no-op cells without a forward (both engines; exact).

    Returns:
        A :class:`PatchResult` with ``kind="activation"``; ``source`` = clean run, ``target`` = corrupted run.

    Raises:
        EntitylensError: for an unknown component/grid/method, roles missing from a side, a tokenizer
            mismatch between the model and the pairs, or a grid the pairs cannot support.
    """
    _check_model(model)
    _check_component_grid(component, grid, method)
    batch_cells = _check_batch_cells(batch_cells)
    plist = _pairs_list(pairs)
    _check_tokens(model, plist)
    n_layers = int(model.cfg.n_layers)
    layer_list = _resolve_layers(layers, n_layers)
    names, columns = _grid_columns(grid, plist, roles, positions, int(model.cfg.n_heads), "clean", "corrupted")
    jobs = []
    for p, cols in zip(plist, columns):
        cells = [_Cell(li, ci, layer, sp, dp, h) for li, layer in enumerate(layer_list) for ci, sp, dp, h in cols]
        jobs.append(
            _Job(
                p.clean_tokens,
                p.corrupted_tokens,
                p.clean_answer_pos,
                p.corrupted_answer_pos,
                p.clean_answer,
                p.corrupted_answer,
                cells,
                same_model=True,
                name=p.name,
            )
        )
    runner = _make_runner(model, method)
    if isinstance(runner, _TwinRunner):
        try:
            for p in plist:
                runner.check_length(max(len(p.clean_tokens), len(p.corrupted_tokens)))
            if not _verify_twin(runner, plist[0].corrupted_tokens, plist[0].corrupted_answer_pos):
                runner = _HookRunner(model)
        except _Unsupported as e:
            warnings.warn(_fallback_message(e), stacklevel=2)
            runner = _HookRunner(model)
    res = _run_jobs(
        runner, runner, jobs, component, layer_list, len(names), batch_cells, skip_noop_cells, desc=f"patch {component}"
    )
    return _result("activation", component, grid, runner.path, layer_list, names, plist, res)


def _result(
    kind: str,
    component: str,
    grid: str,
    path: str,
    layers: Sequence[int],
    names: Sequence[str],
    pairs: Sequence[PatchPair],
    res: _Outcome,
) -> PatchResult:
    return PatchResult(
        kind=kind,
        component=component,
        grid=grid,
        path=path,
        layers=tuple(int(x) for x in layers),
        cells=tuple(names),
        pair_names=tuple(p.name for p in pairs),
        normalised=normalise(res.ld, res.src_ld, res.dst_ld),
        logit_diff=res.ld,
        prob=res.prob,
        top1=res.top1,
        source_logit_diff=res.src_ld,
        target_logit_diff=res.dst_ld,
        source_prob=res.src_prob,
        target_prob=res.dst_prob,
        n_forward_cells=res.n_forward,
        n_noop_cells=res.n_noop,
    )
