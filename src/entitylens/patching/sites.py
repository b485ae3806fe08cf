"""Multi-site patching: a *set* of sites (component x layer x head x role) patched jointly in one forward.

A :class:`Site` names one activation slice: ``head:3.2@last`` (head 2's output ``z`` at layer 3, at the
``last`` role), ``mlp_out:1@query_box``, ``resid_pre:4`` (every position), ``q:5.0@last`` (the query input
of head 0 at layer 5; ``k`` / ``v`` index key/value heads). :func:`patch_sites` runs each pair's corrupted
prompt with the clean run's values written into every site of a circuit at once -- many circuits per
forward, one row each -- optionally *freezing* other sites to their corrupted values (so a circuit's effect
cannot flow through them), and reports the normalised logit difference per (pair, circuit).

:func:`patched_forward` is the primitive (also used by path patching, :mod:`entitylens.patching.paths`):
one batched forward of one prompt where each row has its own replacements at its own hooks, positions and
heads, recording chosen hooks on the way.

Caveat of the bridge: ``hook_resid_mid`` feeds the MLP but not the residual stream, so ``resid_mid`` is not
a site here (patch ``attn_out`` of that layer, or ``resid_pre`` of the next).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from entitylens.errors import EntitylensError
from entitylens.patching.metric import answer_metrics, normalise
from entitylens.patching.types import PatchPair
from entitylens.progress import progress

__all__ = ["SITE_HOOKS", "Edit", "PatchMetrics", "Site", "SiteResult", "answer_ld", "capture_sites", "check_sites",
           "parse_sites", "patch_sites", "patched_forward", "site_positions", "site_value"]

SITE_HOOKS: Mapping[str, str] = {
    "resid_pre": "blocks.{}.hook_resid_pre",
    "resid_post": "blocks.{}.hook_resid_post",
    "attn_out": "blocks.{}.hook_attn_out",
    "mlp_out": "blocks.{}.hook_mlp_out",
    "head": "blocks.{}.attn.hook_z",
    "q": "blocks.{}.attn.hook_q",
    "k": "blocks.{}.attn.hook_k",
    "v": "blocks.{}.attn.hook_v",
}
"""Site components and their TransformerBridge hooks (``head``, ``q``, ``k``, ``v`` take a head index)."""

_HEADED = frozenset({"head", "q", "k", "v"})
_SITE_RE = re.compile(r"^(?P<comp>[a-z_]+):(?P<layer>\d+|\*)(?:\.(?P<head>\d+|\*))?(?:@(?P<role>[A-Za-z0-9_]+))?$")


@dataclass(frozen=True)
class Site:
    """One activation slice: ``component`` at ``layer`` (head ``head``), at the positions of ``role``.

    Attributes:
        component: A key of :data:`SITE_HOOKS`.
        layer: Block index.
        head: Head index for ``head`` / ``q`` (query heads) and ``k`` / ``v`` (key/value heads); else ``None``.
        role: A role of the pairs (its position on each side); ``None``: every position (equal-length pairs).
    """

    component: str
    layer: int
    head: int | None = None
    role: str | None = None

    def __post_init__(self) -> None:
        if self.component not in SITE_HOOKS:
            raise EntitylensError(f"unknown site component {self.component!r}; use one of {sorted(SITE_HOOKS)}")
        if (self.head is None) == (self.component in _HEADED):
            want = "needs a head (e.g. head:3.2)" if self.component in _HEADED else "takes no head"
            raise EntitylensError(f"site {self.component}:{self.layer}: {self.component} {want}")
        if self.layer < 0 or (self.head is not None and self.head < 0):
            raise EntitylensError(f"site {self}: layer and head must be >= 0")

    @property
    def hook(self) -> str:
        """The bridge hook name."""
        return SITE_HOOKS[self.component].format(self.layer)

    def __str__(self) -> str:
        head = "" if self.head is None else f".{self.head}"
        role = "" if self.role is None else f"@{self.role}"
        return f"{self.component}:{self.layer}{head}{role}"


def parse_sites(text: str, n_layers: int, n_heads: int, n_kv_heads: int | None = None) -> tuple[Site, ...]:
    """Comma-separated sites; ``*`` for the layer or head expands to every layer / head of the model.

    Args:
        text: E.g. ``"head:3.*@last,mlp_out:*@query_box"``.
        n_layers: The model's layers.
        n_heads: Its query heads (``head``, ``q``).
        n_kv_heads: Its key/value heads (``k``, ``v``; default ``n_heads``).

    Returns:
        The sites, in the order written (expansions in index order).
    """
    out: list[Site] = []
    for tok in (t.strip() for t in text.split(",")):
        if not tok:
            continue
        m = _SITE_RE.match(tok)
        if not m:
            raise EntitylensError(f"cannot parse site {tok!r}; write component:layer[.head][@role], "
                                  "e.g. head:3.2@last, head:3.*@last or mlp_out:*@query_box")
        comp, lay, head = m.group("comp"), m.group("layer"), m.group("head")
        layers = range(n_layers) if lay == "*" else [int(lay)]
        nh = (n_kv_heads or n_heads) if comp in ("k", "v") else n_heads
        heads: Sequence[int | None] = [None] if head is None else (range(nh) if head == "*" else [int(head)])
        out.extend(Site(comp, la, h, m.group("role")) for la in layers for h in heads)
    if not out:
        raise EntitylensError(f"no sites in {text!r}; e.g. head:3.2@last")
    return tuple(out)


@dataclass
class Edit:
    """One row's replacement at one hook: ``act[row, pos(, head)] = value``."""

    row: int
    hook: str
    pos: Tensor
    head: int | None
    value: Tensor


def site_positions(p: PatchPair, role: str | None, side: str) -> Tensor:
    """Positions of ``role`` on one side of a pair (no role: every position; a clean side needs equal lengths)."""
    if role is None:
        if side == "clean" and not p.same_length:
            raise EntitylensError(f"pair {p.name!r}: a site without @role patches every position, which needs "
                                  "equal-length prompts; give the site a role")
        return torch.arange(len(p.corrupted_tokens))
    roles = p.clean_roles if side == "clean" else p.corrupted_roles
    if role not in roles:
        raise EntitylensError(f"pair {p.name!r}: role {role!r} is missing; use a role every pair has")
    return torch.tensor([roles[role]])


def capture_sites(model: Any, tokens: Tensor, hooks: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
    """One unpatched run: its logits ``[T, V]`` and the activations ``[T, ...]`` at ``hooks``."""
    wanted = set(hooks)
    dev = next(model.parameters()).device
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens[None].to(dev), names_filter=lambda n: n in wanted)
    return logits[0], {h: cache[h][0].detach() for h in wanted}


def _setter(edits: Sequence[Edit]) -> Any:
    def hook(act: Tensor, hook: Any) -> Tensor:
        act = act.clone()
        for e in edits:
            if e.head is None:
                act[e.row, e.pos] = e.value.to(act)
            else:
                act[e.row, e.pos, e.head] = e.value.to(act)
        return act

    return hook


def _recorder(name: str, store: dict[str, Tensor]) -> Any:
    def hook(act: Tensor, hook: Any) -> Tensor:
        store[name] = act.detach().clone()
        return act

    return hook


def patched_forward(model: Any, tokens: Tensor, rows: int, edits: Sequence[Edit], answer_pos: int,
                    record: Sequence[str] = ()) -> tuple[Tensor, dict[str, Tensor]]:
    """Run ``tokens`` as ``rows`` identical rows, each with its own edits; return answer logits and recordings.

    Args:
        model: A ``TransformerBridge``.
        tokens: ``[T]`` prompt.
        rows: Batch rows.
        edits: Replacements (row, hook, positions, head, value); rows without edits run unpatched.
        answer_pos: Position whose logits are returned.
        record: Hooks whose (patched) activations ``[rows, T, ...]`` are returned.

    Returns:
        ``[rows, V]`` logits at ``answer_pos`` and ``{hook: activation}``.
    """
    by_hook: dict[str, list[Edit]] = {}
    for e in edits:
        by_hook.setdefault(e.hook, []).append(e)
    store: dict[str, Tensor] = {}
    hooks = [(h, _setter(es)) for h, es in by_hook.items()] + [(h, _recorder(h, store)) for h in record]
    dev = next(model.parameters()).device
    with torch.no_grad():
        logits = model.run_with_hooks(tokens[None].expand(rows, len(tokens)).to(dev), fwd_hooks=hooks)
    return logits[:, answer_pos], store


@dataclass(frozen=True)
class PatchMetrics:
    """Metrics of patched runs over pairs (CPU); ``[pair, ...]`` grids and ``[pair]`` baselines.

    Attributes:
        ld: Logit difference of each patched corrupted run.
        normalised: ``(ld - ld_corrupted) / (ld_clean - ld_corrupted)`` (1 = clean behaviour, 0 = corrupted).
        prob: Clean-answer probability.
        top1: Whether the clean answer is the top-1 token.
        ld_clean: ``[pair]`` clean run's logit difference; ld_corrupted: ``[pair]`` corrupted run's.
        pair_names: Names of the pairs.
    """

    ld: Tensor
    normalised: Tensor
    prob: Tensor
    top1: Tensor
    ld_clean: Tensor
    ld_corrupted: Tensor
    pair_names: tuple[str, ...]


@dataclass(frozen=True)
class SiteResult(PatchMetrics):
    """Per (pair, circuit) metrics of :func:`patch_sites` (grids ``[pair, circuit]``).

    Attributes:
        circuits: Each circuit's name (its sites joined by ``+``).
    """

    circuits: tuple[str, ...] = ()


def check_sites(model: Any, sites: Sequence[Site]) -> None:
    """Refuse sites beyond the model's layers or heads (key/value heads for ``k`` / ``v``), one line each."""
    n = int(model.cfg.n_layers)
    bad = [str(s) for s in sites if s.layer >= n]
    if bad:
        raise EntitylensError(f"site(s) {bad} are beyond the model's {n} layers; use layers 0-{n - 1}")
    n_heads = int(model.cfg.n_heads)
    n_kv = int(getattr(model.cfg, "n_key_value_heads", None) or n_heads)
    for s in sites:
        have = n_kv if s.component in ("k", "v") else n_heads
        if s.head is not None and s.head >= have:
            kind = "key/value heads" if s.component in ("k", "v") else "heads"
            raise EntitylensError(f"site {s}: the model has {have} {kind} at layer {s.layer}; "
                                  f"use a head in 0-{have - 1}")


def answer_ld(logits: Tensor, p: PatchPair) -> Tensor:
    """The logit difference (clean answer - corrupted answer) of one ``[V]`` answer-logits row."""
    return answer_metrics(logits[None], p.clean_answer, p.corrupted_answer)[0][0]


def patch_sites(model: Any, pairs: Sequence[PatchPair], circuits: Sequence[Sequence[Site]],
                freeze: Sequence[Site] = (), batch: int = 16) -> SiteResult:
    """Patch each circuit's sites jointly (clean values into the corrupted run), other ``freeze`` sites held.

    Args:
        model: A ``TransformerBridge``.
        pairs: Tokenised pairs (:func:`~entitylens.patching.run.prepare_pairs`).
        circuits: Each a set of sites patched together in one forward.
        freeze: Sites held at their corrupted values in every circuit's run (e.g. every other head of the
            circuit's layers), so a circuit's effect cannot flow through them. A site both patched and frozen
            is patched.
        batch: Most circuits per forward.

    Returns:
        The :class:`SiteResult`.
    """
    if not circuits or any(not c for c in circuits):
        raise EntitylensError("give at least one circuit, each with at least one site")
    all_sites = [s for c in circuits for s in c] + list(freeze)
    check_sites(model, all_sites)
    hooks = sorted({s.hook for s in all_sites})
    P, Cn = len(pairs), len(circuits)
    out = {k: torch.zeros(P, Cn) for k in ("ld", "prob", "top1")}
    ld_clean, ld_corr = torch.zeros(P), torch.zeros(P)
    for pi, p in enumerate(progress(pairs, desc="circuits", unit="pair")):
        c_logits, c_acts = capture_sites(model, p.clean_tokens, hooks)
        x_logits, x_acts = capture_sites(model, p.corrupted_tokens, hooks)
        ld_clean[pi] = answer_ld(c_logits[p.clean_answer_pos], p)
        ld_corr[pi] = answer_ld(x_logits[p.corrupted_answer_pos], p)
        for c0 in range(0, Cn, batch):
            chunk = circuits[c0:c0 + batch]
            edits: list[Edit] = []
            for row, circuit in enumerate(chunk):
                patched = set(circuit)
                for s in freeze:
                    if s not in patched:
                        dst = site_positions(p, s.role, "corrupted")
                        edits.append(Edit(row, s.hook, dst, s.head, site_value(x_acts[s.hook], dst, s.head)))
                for s in circuit:
                    src, dst = site_positions(p, s.role, "clean"), site_positions(p, s.role, "corrupted")
                    edits.append(Edit(row, s.hook, dst, s.head, site_value(c_acts[s.hook], src, s.head)))
            logits, _ = patched_forward(model, p.corrupted_tokens, len(chunk), edits, p.corrupted_answer_pos)
            ld, prob, top1 = answer_metrics(logits, p.clean_answer, p.corrupted_answer)
            sl = slice(c0, c0 + len(chunk))
            out["ld"][pi, sl], out["prob"][pi, sl], out["top1"][pi, sl] = ld.cpu(), prob.cpu(), top1.float().cpu()
    return SiteResult(circuits=tuple("+".join(str(s) for s in c) for c in circuits), ld=out["ld"],
                      normalised=normalise(out["ld"], ld_clean, ld_corr), prob=out["prob"],
                      top1=out["top1"].bool(), ld_clean=ld_clean, ld_corrupted=ld_corr,
                      pair_names=tuple(p.name for p in pairs))


def site_value(act: Tensor, pos: Tensor, head: int | None) -> Tensor:
    """``act[pos]`` (``act[pos, head]`` for a headed site) of one run's ``[T, ...]`` activation."""
    idx = pos.to(act.device)
    return act[idx] if head is None else act[idx, head]
