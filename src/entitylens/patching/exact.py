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

This module is the driver (:func:`patch_grid`). The pieces live beside it: the types in
:mod:`entitylens.patching.types`, input checks and grid resolution in :mod:`entitylens.patching.grid`,
cells/jobs and the no-op filter in :mod:`entitylens.patching.jobs`, the engines in
:mod:`entitylens.patching.engine_hooks` and :mod:`entitylens.patching.engine_fast` (whose module settings tune
the fast engine), and the choice between them in :mod:`entitylens.patching.engines`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from entitylens.patching.engine_fast import TwinRunner, Unsupported
from entitylens.patching.engine_hooks import HookRunner
from entitylens.patching.engines import fallback_message, make_runner, verify_twin
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
from entitylens.patching.metric import normalise as normalise  # re-exported: exact.normalise
from entitylens.patching.types import (
    COMPONENTS,
    GRIDS,
    PATH_FAST,
    PATH_HOOKS,
    Component,
    Grid,
    Method,
    PatchPair,
    PatchResult,
    hook_name,
    tokenizer_fingerprint,
)

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
    "patch_grid",
    "tokenizer_fingerprint",
]


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
    check_model(model)
    check_component_grid(component, grid, method)
    batch_cells = check_batch_cells(batch_cells)
    plist = pairs_list(pairs)
    check_tokens(model, plist)
    n_layers = int(model.cfg.n_layers)
    layer_list = resolve_layers(layers, n_layers)
    names, columns = grid_columns(grid, plist, roles, positions, int(model.cfg.n_heads), "clean", "corrupted")
    jobs = []
    for p, cols in zip(plist, columns):
        cells = [Cell(li, ci, layer, sp, dp, h) for li, layer in enumerate(layer_list) for ci, sp, dp, h in cols]
        jobs.append(
            Job(
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
    runner = make_runner(model, method)
    if isinstance(runner, TwinRunner):
        try:
            for p in plist:
                runner.check_length(max(len(p.clean_tokens), len(p.corrupted_tokens)))
            if not verify_twin(runner, plist[0].corrupted_tokens, plist[0].corrupted_answer_pos):
                runner = HookRunner(model)
        except Unsupported as e:
            warnings.warn(fallback_message(e), stacklevel=2)
            runner = HookRunner(model)
    res = run_jobs(
        runner, runner, jobs, component, layer_list, len(names), batch_cells, skip_noop_cells, desc=f"patch {component}"
    )
    return build_result("activation", component, grid, runner.path, layer_list, names, plist, res)
