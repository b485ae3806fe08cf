"""Units of engine work and the engine-independent loop over them.

A :class:`Job` is one source run patched into one target run (a pair's clean -> corrupted run, or one prompt
across two models), split into :class:`Cell` s. Both engines (:mod:`entitylens.patching.engine_hooks`,
:mod:`entitylens.patching.engine_fast`) implement :class:`Runner`: capture a full run as a :class:`Capture`, then
run a list of cells. :func:`run_jobs` drives any pair of runners over the jobs, resolving provable no-op cells
without a forward (:func:`filter_noop_cells`), and :func:`build_result` turns its :class:`Outcome` into a
:class:`~entitylens.patching.types.PatchResult`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from entitylens.patching.metric import answer_metrics, normalise
from entitylens.patching.types import PatchPair, PatchResult
from entitylens.progress import progress

__all__ = [
    "Capture",
    "Cell",
    "Job",
    "Outcome",
    "Runner",
    "build_result",
    "entries_equal",
    "filter_noop_cells",
    "metrics_row",
    "run_jobs",
]


@dataclass
class Cell:
    """One grid cell of one job: patch ``source[layer, src]`` into ``target[layer, dst]`` (head ``head``)."""

    li: int
    ci: int
    layer: int
    src: tuple[int, ...]
    dst: tuple[int, ...]
    head: int | None = None


@dataclass
class Job:
    """One source run patched into one target run (a pair, or a prompt across two models)."""

    src_tokens: Tensor
    dst_tokens: Tensor
    src_answer_pos: int
    dst_answer_pos: int
    good: int
    bad: int
    cells: list[Cell]
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
class Outcome:
    """What :func:`run_jobs` measured: ``[job, layer, cell]`` grids and ``[job]`` unpatched baselines (CPU)."""

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
class Capture:
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


def metrics_row(logits: Tensor, good: int, bad: int) -> tuple[Tensor, Tensor, Tensor]:
    """Logit difference, clean-answer probability and top-1 flag of one ``[vocab]`` logits row."""
    ld, prob, top1 = answer_metrics(logits[None], good, bad)
    return ld[0], prob[0], top1[0]


@runtime_checkable
class Runner(Protocol):
    """What :func:`run_jobs` needs of an engine.

    Implemented by :class:`~entitylens.patching.engine_hooks.HookRunner` and
    :class:`~entitylens.patching.engine_fast.TwinRunner`.
    """

    path: str

    def capture(
        self, tokens: Tensor, component: str, layers: Sequence[int], answer_pos: int, good: int, bad: int
    ) -> Capture:
        """One full unpatched run: the component's activations at ``layers`` and the answer metrics."""
        ...

    def run_cells(
        self,
        job: Job,
        src: Capture,
        dst: Capture,
        component: str,
        cells: Sequence[Cell],
        batch_cells: int,
        out: tuple[Tensor, Tensor, Tensor],
        desc: str,
    ) -> None:
        """Patch every cell into the target run and write its metrics into ``out`` (``ld, prob, top1``)."""
        ...


def filter_noop_cells(job: Job, cells: list[Cell], src: Capture, dst: Capture) -> tuple[list[Cell], list[Cell]]:
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
        eq = entries_equal(flat, src.acts, dst.acts)
        for (k, _, sp, dp, _), same in zip(flat, eq):
            if not same:
                keep.setdefault(k, []).append((sp, dp))
    run, noop = [], []
    for k, c in enumerate(cells):
        if k in keep:
            sps, dps = zip(*keep[k])
            run.append(Cell(c.li, c.ci, c.layer, tuple(sps), tuple(dps), c.head))
        else:
            noop.append(c)
    return run, noop


def entries_equal(
    flat: list[tuple[int, int, int, int, int | None]], src_acts: dict[int, Tensor], dst_acts: dict[int, Tensor]
) -> list[bool]:
    """For each entry ``(cell idx, layer, src pos, dst pos, head)``: are source and target activations identical?"""
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


def run_jobs(
    src_runner: Runner,
    dst_runner: Runner,
    jobs: Sequence[Job],
    component: str,
    layers: Sequence[int],
    n_cols: int,
    batch_cells: int,
    skip_noop_cells: bool,
    desc: str,
) -> Outcome:
    """Capture both runs of every job, resolve its no-op cells and let ``dst_runner`` run the rest.

    Args:
        src_runner: Engine of the source run (clean side, or model A).
        dst_runner: Engine of the target run (corrupted side, or model B); it runs the patched cells.
        jobs: The jobs, one per pair.
        component: Patched activation.
        layers: Grid rows.
        n_cols: Grid columns.
        batch_cells: Most cells per forward.
        skip_noop_cells: Resolve provable no-op cells without a forward.
        desc: Progress-bar label.

    Returns:
        The grids and baselines of every job, and how many cells ran / were no-ops.
    """
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
            run, noop = filter_noop_cells(job, job.cells, src, dst)
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
    return Outcome(
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


def build_result(
    kind: str,
    component: str,
    grid: str,
    path: str,
    layers: Sequence[int],
    names: Sequence[str],
    pairs: Sequence[PatchPair],
    res: Outcome,
) -> PatchResult:
    """The :class:`~entitylens.patching.types.PatchResult` of an :class:`Outcome` (normalised between baselines)."""
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
