"""Path patching: the effect of a sender component on the behaviour *through* one receiver only.

The textbook definition (Wang et al. 2022; Goldowsky-Dill et al. 2023), on a clean/corrupted pair:

1. run the corrupted prompt with the sender (a head's output ``z``, an MLP's or an attention layer's
   output, at a role) set to its clean value and every attention head after it frozen to its corrupted
   value (``freeze_mlps=True`` also freezes the MLPs; by default they recompute, as in the IOI study), and
   record the receiver's input: the residual stream at a layer and role (``resid_pre`` / ``resid_post``), or
   a head's query / key / value (``q`` / ``k`` / ``v``, which index key/value heads under GQA);
2. run the corrupted prompt again with only the receiver's input set to what step 1 recorded, and measure
   the normalised logit difference (1: the clean behaviour, 0: the corrupted one).

:func:`path_patch` does step 1 once per sender for *every* receiver (one row per sender, all receivers
recorded in the same forward) and step 2 for every (sender, receiver) cell, many rows per forward; the
textbook implementation runs two forwards per cell. Each pair's rows share its corrupted prompt, so no
padding. The result is a ``[pair, sender, receiver]`` grid (:class:`PathResult`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from entitylens.errors import EntitylensError
from entitylens.patching.metric import answer_metrics, normalise
from entitylens.patching.sites import (
    SITE_HOOKS,
    Edit,
    PatchMetrics,
    Site,
    answer_ld,
    capture_sites,
    check_sites,
    patched_forward,
    site_positions,
    site_value,
)
from entitylens.patching.types import PatchPair
from entitylens.progress import progress

__all__ = ["RECEIVERS", "SENDERS", "PathResult", "check_path_sites", "path_patch", "reads_after"]

SENDERS = ("head", "attn_out", "mlp_out")
"""Components a path can start from."""

RECEIVERS = ("resid_pre", "resid_post", "q", "k", "v")
"""Components a path can end at."""


@dataclass(frozen=True)
class PathResult(PatchMetrics):
    """Path-patching grids over pairs (``[pair, sender, receiver]``; metrics as :class:`PatchMetrics`).

    Attributes:
        senders: Sender sites (rows of the grid).
        receivers: Receiver sites (columns).
        freeze_mlps: Whether MLPs were frozen in step 1.
    """

    senders: tuple[Site, ...] = ()
    receivers: tuple[Site, ...] = ()
    freeze_mlps: bool = False

    def mean(self) -> Tensor:
        """``[sender, receiver]`` mean normalised effect over pairs (pairs without a scale skipped)."""
        return self.normalised.nanmean(0)


def reads_after(sender: Site, receiver: Site) -> bool:
    """Whether ``receiver`` sits after ``sender`` (``resid_post``: the same layer or later; else a later layer)."""
    if receiver.component == "resid_post":
        return receiver.layer >= sender.layer
    return receiver.layer > sender.layer


def check_path_sites(senders: Sequence[Site], receivers: Sequence[Site]) -> None:
    """Refuse unknown kinds and receivers that cannot read a sender (one line each)."""
    if not senders or not receivers:
        raise EntitylensError("give at least one sender and one receiver, e.g. --senders head:2.*@last "
                              "--receivers resid_pre:4@last")
    bad_s = [str(s) for s in senders if s.component not in SENDERS]
    bad_r = [str(r) for r in receivers if r.component not in RECEIVERS]
    if bad_s:
        raise EntitylensError(f"sender(s) {bad_s}: a path starts at one of {SENDERS}")
    if bad_r:
        raise EntitylensError(f"receiver(s) {bad_r}: a path ends at one of {RECEIVERS}")
    if not any(reads_after(s, r) for s in senders for r in receivers):
        raise EntitylensError("every sender is at or after every receiver; a receiver must sit at a later layer "
                              "than its sender (resid_post: the same layer or later)")


def _step1_edits(row: int, s: Site, p: PatchPair, c_acts: dict[str, Tensor], x_acts: dict[str, Tensor],
                 n_layers: int, freeze_mlps: bool) -> list[Edit]:
    """The sender at its clean value; every later head (and MLP) at its corrupted value."""
    src, dst = site_positions(p, s.role, "clean"), site_positions(p, s.role, "corrupted")
    edits = [Edit(row, s.hook, dst, s.head, site_value(c_acts[s.hook], src, s.head))]
    every = torch.arange(len(p.corrupted_tokens))
    first_frozen_head_layer = s.layer + 1  # heads at the sender's layer do not see it
    for layer in range(first_frozen_head_layer, n_layers):
        h = SITE_HOOKS["head"].format(layer)
        edits.append(Edit(row, h, every, None, x_acts[h]))
    if freeze_mlps:
        for layer in range(s.layer, n_layers):
            if s.component == "mlp_out" and layer == s.layer:
                continue
            h = SITE_HOOKS["mlp_out"].format(layer)
            edits.append(Edit(row, h, every, None, x_acts[h]))
    return edits


def path_patch(model: Any, pairs: Sequence[PatchPair], senders: Sequence[Site], receivers: Sequence[Site],
               freeze_mlps: bool = False, batch: int = 16, method: str = "fast") -> PathResult:
    """Path patching of every (sender, receiver) on every pair (see the module docstring).

    Args:
        model: A ``TransformerBridge``.
        pairs: Tokenised pairs.
        senders: Sites the paths start at (``head``, ``attn_out``, ``mlp_out``; at a role).
        receivers: Sites the paths end at (``resid_pre`` / ``resid_post`` at a role, or ``q`` / ``k`` / ``v``
            of a head at a role; no role: every position).
        freeze_mlps: Freeze MLPs too in step 1 (only the direct and attention-mediated path counts).
        batch: Most rows per forward.
        method: ``"fast"`` (default: the fast engine's twin with causal reuse,
            :mod:`~entitylens.patching.paths_fast`; falls back to hooks, with a warning, for a model it cannot
            run) or ``"hooks"`` (the bridge's hooks: the reference).

    Returns:
        The :class:`PathResult`; cells whose receiver cannot read the sender (not later) are ``nan``.
    """
    check_path_sites(senders, receivers)
    check_sites(model, [*senders, *receivers])
    if method not in ("fast", "hooks"):
        raise EntitylensError(f"unknown method {method!r}; use 'fast' or 'hooks'")
    fast = _fast_engine(model, pairs) if method == "fast" else None
    if fast is not None:
        return _fast(fast, pairs, senders, receivers, freeze_mlps, batch)
    n_layers = int(model.cfg.n_layers)
    freeze_hooks = [SITE_HOOKS["head"].format(la) for la in range(n_layers)]
    if freeze_mlps:
        freeze_hooks += [SITE_HOOKS["mlp_out"].format(la) for la in range(n_layers)]
    need = sorted({s.hook for s in senders} | {r.hook for r in receivers} | set(freeze_hooks))
    rec_hooks = sorted({r.hook for r in receivers})
    S, R = len(senders), len(receivers)
    out, ld_clean, ld_corr = _empty(len(pairs), S, R)
    cells = [(si, ri) for si in range(S) for ri in range(R) if reads_after(senders[si], receivers[ri])]
    for pi, p in enumerate(progress(pairs, desc="path patching", unit="pair")):
        c_logits, c_acts = capture_sites(model, p.clean_tokens, need)
        x_logits, x_acts = capture_sites(model, p.corrupted_tokens, need)
        ld_clean[pi] = answer_ld(c_logits[p.clean_answer_pos], p)
        ld_corr[pi] = answer_ld(x_logits[p.corrupted_answer_pos], p)
        # step 1: one row per sender, every receiver's input recorded
        recorded: dict[str, list[Tensor]] = {h: [] for h in rec_hooks}
        for s0 in range(0, S, batch):
            chunk = senders[s0:s0 + batch]
            edits = [e for row, s in enumerate(chunk)
                     for e in _step1_edits(row, s, p, c_acts, x_acts, n_layers, freeze_mlps)]
            _, rec = patched_forward(model, p.corrupted_tokens, len(chunk), edits, p.corrupted_answer_pos,
                                     record=rec_hooks)
            for h in rec_hooks:
                recorded[h].append(rec[h])
        inputs = {h: torch.cat(v) for h, v in recorded.items()}  # [S, T, ...]
        # step 2: one row per (sender, receiver) cell, only the receiver's input patched
        for c0 in range(0, len(cells), batch):
            chunk_cells = cells[c0:c0 + batch]
            edits = []
            for row, (si, ri) in enumerate(chunk_cells):
                r = receivers[ri]
                pos = site_positions(p, r.role, "corrupted")
                edits.append(Edit(row, r.hook, pos, r.head, site_value(inputs[r.hook][si], pos, r.head)))
            logits, _ = patched_forward(model, p.corrupted_tokens, len(chunk_cells), edits, p.corrupted_answer_pos)
            ld, prob, top1 = answer_metrics(logits, p.clean_answer, p.corrupted_answer)
            si_t = torch.tensor([c[0] for c in chunk_cells])
            ri_t = torch.tensor([c[1] for c in chunk_cells])
            out["ld"][pi, si_t, ri_t] = ld.cpu()
            out["prob"][pi, si_t, ri_t] = prob.cpu()
            out["top1"][pi, si_t, ri_t] = top1.float().cpu()
    return _result(out, ld_clean, ld_corr, pairs, senders, receivers, freeze_mlps)


def _empty(P: int, S: int, R: int) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """``nan`` grids ``[P, S, R]`` of ld / prob / top1 and zero ``[P]`` baselines."""
    return {k: torch.full((P, S, R), float("nan")) for k in ("ld", "prob", "top1")}, torch.zeros(P), torch.zeros(P)


def _result(out: dict[str, Tensor], ld_clean: Tensor, ld_corr: Tensor, pairs: Sequence[PatchPair],
            senders: Sequence[Site], receivers: Sequence[Site], freeze_mlps: bool) -> PathResult:
    return PathResult(senders=tuple(senders), receivers=tuple(receivers), ld=out["ld"],
                      normalised=normalise(out["ld"], ld_clean, ld_corr), prob=out["prob"], top1=out["top1"],
                      ld_clean=ld_clean, ld_corrupted=ld_corr, pair_names=tuple(p.name for p in pairs),
                      freeze_mlps=freeze_mlps)


def _fast_engine(model: Any, pairs: Sequence[PatchPair]) -> Any:
    """The twin-based engine, or ``None`` (with a warning) where it cannot run or does not reproduce the bridge."""
    from entitylens.patching.engines import make_runner, verify_twin
    from entitylens.patching.paths_fast import FastPaths

    runner = make_runner(model, "fast")
    if not hasattr(runner, "twin") or not pairs:
        return None
    if not verify_twin(runner, pairs[0].corrupted_tokens, pairs[0].corrupted_answer_pos):  # type: ignore[arg-type]
        return None
    return FastPaths(runner)  # type: ignore[arg-type]


def _fast(fp: Any, pairs: Sequence[PatchPair], senders: Sequence[Site], receivers: Sequence[Site],
          freeze_mlps: bool, batch: int) -> PathResult:
    from entitylens.patching.paths_fast import fast_path_grid

    out, ld_clean, ld_corr = _empty(len(pairs), len(senders), len(receivers))
    for pi, p in enumerate(progress(pairs, desc="path patching", unit="pair")):
        grid, c_logits, x_logits = fast_path_grid(fp, p, senders, receivers, freeze_mlps, batch)
        ld_clean[pi], ld_corr[pi] = answer_ld(c_logits, p), answer_ld(x_logits, p)
        ok = ~torch.isnan(grid[:, :, 0])
        if bool(ok.any()):
            ld, prob, top1 = answer_metrics(grid[ok], p.clean_answer, p.corrupted_answer)
            out["ld"][pi][ok.cpu()] = ld.cpu()
            out["prob"][pi][ok.cpu()] = prob.cpu()
            out["top1"][pi][ok.cpu()] = top1.float().cpu()
    return _result(out, ld_clean, ld_corr, pairs, senders, receivers, freeze_mlps)
