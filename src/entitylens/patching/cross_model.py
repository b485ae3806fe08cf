"""Cross-model activation patching: patch model A's activations into model B on the same prompt.

For a prompt (one side of a :class:`~entitylens.patching.exact.PatchPair`) both models run the same tokens;
each grid cell copies A's activation at (layer, role/position/head) into B's run and measures B's logit
difference between the pair's two answer tokens. The result is normalised between the two models,

    ``transfer = (ld_B_patched - ld_B) / (ld_A - ld_B)``,

so 1 means B now behaves like A on that prompt (A's behaviour fully transfers through that cell) and 0 means
nothing changed -- the P24-style experiment "patch the fine-tuned (code) model into its base".

The two models must share the tokenizer (same vocabulary fingerprint) and the patched shapes (layers,
``d_model``; heads and ``d_head`` for ``head_z``). The same causal-reuse engine as
:func:`~entitylens.patching.exact.patch_grid` runs it (patching B at position ``p`` leaves B's positions
``< p`` unchanged); only bit-identical activations count as no-ops here, since the models differ.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

from entitylens.errors import EntitylensError
from entitylens.patching.engine_fast import TwinRunner, Unsupported
from entitylens.patching.engine_hooks import HookRunner
from entitylens.patching.engines import make_runner, verify_twin
from entitylens.patching.grid import (
    check_batch_cells,
    check_component_grid,
    check_model,
    check_tokens,
    grid_columns,
    pairs_list,
    resolve_layers,
)
from entitylens.patching.jobs import Cell, Job, build_result, run_jobs
from entitylens.patching.types import Component, Grid, Method, PatchPair, PatchResult, tokenizer_fingerprint

__all__ = ["check_compatible", "cross_model_patch"]


def check_compatible(source: Any, target: Any, component: str = "resid_pre") -> None:
    """Refuse model pairs whose activations cannot be swapped (tokenizer or shapes differ).

    Raises:
        EntitylensError: naming the mismatch.
    """
    check_model(source, "source")
    check_model(target, "target")
    ts, tt = getattr(source, "tokenizer", None), getattr(target, "tokenizer", None)
    if ts is not None and tt is not None and tokenizer_fingerprint(ts) != tokenizer_fingerprint(tt):
        raise EntitylensError(
            "source and target models use different tokenizers, so the same prompt is not the "
            "same tokens; cross-model patching needs a model pair that shares a tokenizer"
        )
    keys = ["n_layers", "d_model", "d_vocab"] + (["n_heads", "d_head"] if component == "head_z" else [])
    for key in keys:
        a, b = getattr(source.cfg, key, None), getattr(target.cfg, key, None)
        if a != b:
            raise EntitylensError(
                f"source and target differ in {key} ({a} vs {b}); cross-model patching needs "
                f"models of the same shape (e.g. a fine-tune and its base)"
            )


def cross_model_patch(
    source: Any,
    target: Any,
    prompts: PatchPair | Sequence[PatchPair],
    component: Component = "resid_pre",
    grid: Grid = "layer_role",
    *,
    side: Literal["clean", "corrupted"] = "clean",
    roles: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    batch_cells: int = 32,
    method: Method = "fast",
    skip_noop_cells: bool = True,
) -> PatchResult:
    """Patch ``source`` (model A) activations into ``target`` (model B), cell by cell, on the same prompts.

    Args:
        source: Model A (``TransformerBridge``), e.g. the code model.
        target: Model B, e.g. its base model.
        prompts: Pairs whose ``side`` prompt is run through both models; the metric is the logit difference
            ``clean_answer - corrupted_answer`` at that side's answer position.
        component: Activation to patch (see :data:`~entitylens.patching.exact.COMPONENTS`).
        grid: ``"layer_role"`` (that side's roles), ``"layer_pos"`` or ``"layer_head"``.
        side: Which prompt of each pair to use.
        roles: Grid columns (layer_role) / patched positions (layer_head).
        layers: Grid rows.
        positions: Columns of a layer_pos grid.
        batch_cells: Most cells per forward.
        method: ``"fast"`` (falls back to hooks when either model is unsupported) or ``"hooks"``.
        skip_noop_cells: Skip cells whose A and B activations are bit-identical (exact).

    Returns:
        A :class:`PatchResult` with ``kind="cross_model"``: ``source_*`` are model A's unpatched values,
        ``target_*`` model B's, and ``normalised`` is the fraction of A's behaviour that transfers.

    Raises:
        EntitylensError: different tokenizers or shapes, or any bad input ``patch_grid`` refuses.
    """
    if side not in ("clean", "corrupted"):
        raise EntitylensError(f"side must be 'clean' or 'corrupted', got {side!r}")
    check_component_grid(component, grid, method)
    check_compatible(source, target, component)
    batch_cells = check_batch_cells(batch_cells)
    plist = pairs_list(prompts)
    check_tokens(target, plist)
    layer_list = resolve_layers(layers, int(target.cfg.n_layers))
    names, columns = grid_columns(grid, plist, roles, positions, int(target.cfg.n_heads), side, side)
    jobs = _side_jobs(plist, columns, layer_list, side)
    src_runner = make_runner(source, method)
    dst_runner = make_runner(target, method)
    if isinstance(src_runner, TwinRunner) and isinstance(dst_runner, TwinRunner):
        try:
            for j in jobs:
                src_runner.check_length(len(j.src_tokens))
                dst_runner.check_length(len(j.dst_tokens))
            ok = all(verify_twin(r, jobs[0].dst_tokens, jobs[0].dst_answer_pos) for r in (src_runner, dst_runner))
        except Unsupported as e:
            warnings.warn(f"fast patching unavailable ({e}); using the bridge-hooks engine", stacklevel=2)
            ok = False
        if not ok:
            src_runner, dst_runner = HookRunner(source), HookRunner(target)
    elif isinstance(src_runner, TwinRunner) or isinstance(dst_runner, TwinRunner):
        src_runner, dst_runner = HookRunner(source), HookRunner(target)
    res = run_jobs(src_runner, dst_runner, jobs, component, layer_list, len(names), batch_cells, skip_noop_cells,
                   desc=f"cross-model {component}")  # fmt: skip
    return build_result("cross_model", component, grid, dst_runner.path, layer_list, names, plist, res)


def _side_jobs(
    plist: Sequence[PatchPair],
    columns: Sequence[Sequence[tuple[int, tuple[int, ...], tuple[int, ...], int | None]]],
    layer_list: Sequence[int],
    side: str,
) -> list[Job]:
    """One job per pair: its ``side`` prompt run through both models (never a shared-prefix no-op)."""
    jobs = []
    for p, cols in zip(plist, columns):
        toks = p.clean_tokens if side == "clean" else p.corrupted_tokens
        pos = p.clean_answer_pos if side == "clean" else p.corrupted_answer_pos
        cells = [Cell(li, ci, layer, sp, dp, h) for li, layer in enumerate(layer_list) for ci, sp, dp, h in cols]
        jobs.append(Job(toks, toks, pos, pos, p.clean_answer, p.corrupted_answer, cells, same_model=False, name=p.name))
    return jobs
