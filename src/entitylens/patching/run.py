"""Patching runs from text pairs: tokenise, choose the grid's roles, run the engine, resumably.

:func:`run_patching` / :func:`run_attribution` / :func:`run_cross` tokenise :class:`~entitylens.patching.pairs.TextPair`
s for the model (or take pre-tokenised :class:`~entitylens.patching.exact.PatchPair` s), choose the grid's
roles (:func:`prepare_pairs`) and call the engine (:func:`~entitylens.patching.exact.patch_grid`,
:func:`~entitylens.patching.attribution.attribution_grid`,
:func:`~entitylens.patching.cross_model.cross_model_patch`). Exact and cross-model runs keep finished chunks of
pairs on disk so a killed run resumes (:func:`resumable`).

What a run writes into its directory lives in :mod:`entitylens.patching.outputs` (:func:`write_patch_outputs`,
:func:`check_run_dir`, :func:`result_table`, :func:`top_cells_summary`); comparing two run directories in
:mod:`entitylens.patching.compare` (:func:`compare_patch_runs`, :func:`run_label`). Both are re-exported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from entitylens._io import sha256_json, write_json
from entitylens.activations.cache import model_fingerprint
from entitylens.errors import EntitylensError
from entitylens.patching.attribution import attribution_grid
from entitylens.patching.compare import KIND_ALIASES, RESULT_STEMS, compare_patch_runs, run_depth, run_label
from entitylens.patching.cross_model import cross_model_patch
from entitylens.patching.exact import COMPONENTS, PatchPair, PatchResult, patch_grid
from entitylens.patching.grid import check_tokens
from entitylens.patching.outputs import (
    CSV_COLUMNS,
    check_run_dir,
    read_manifest,
    result_table,
    top_cells_summary,
    write_patch_outputs,
)
from entitylens.patching.pairs import TextPair, default_roles, to_patch_pairs, validate_role_names

__all__ = [
    "CSV_COLUMNS",
    "KIND_ALIASES",
    "RESULT_STEMS",
    "check_run_dir",
    "compare_patch_runs",
    "default_grid",
    "prepare_pairs",
    "read_manifest",
    "result_table",
    "run_attribution",
    "run_cross",
    "run_depth",
    "run_label",
    "patch_prepared",
    "run_attribution_prepared",
    "run_cross_prepared",
    "run_patching",
    "top_cells_summary",
    "write_patch_outputs",
]


def default_grid(component: str) -> str:
    """``layer_head`` for ``head_z``, else ``layer_role``."""
    if component not in COMPONENTS:
        raise EntitylensError(f"unknown component {component!r}; use one of {', '.join(COMPONENTS)}")
    return "layer_head" if component == "head_z" else "layer_role"


def prepare_pairs(
    model: Any, pairs: Sequence[TextPair] | Sequence[PatchPair], grid: str, roles: Sequence[str] | None = None
) -> tuple[list[PatchPair], list[str] | None]:
    """Tokenise text pairs (or check pre-tokenised ones) and choose the grid's roles.

    Args:
        model: The ``TransformerBridge`` whose tokenizer is used (for pre-tokenised pairs: checked against).
        pairs: Text pairs or tokenised pairs (not mixed).
        grid: ``layer_role`` or ``layer_head`` (or ``layer_pos``: no roles).
        roles: Roles to patch; default :func:`~entitylens.patching.pairs.default_roles`. For ``layer_head``
            the default is every position when all pairs have equal lengths, else the default roles.

    Returns:
        ``(patch pairs, roles)`` where ``roles`` is ``None`` for "every position".

    Raises:
        EntitylensError: empty or mixed pairs, unknown roles, a role missing from a side, tokenizer mismatch.
    """
    plist = list(pairs)
    if not plist:
        raise EntitylensError("no pairs given; build some with `entitylens patch pairs`")
    wanted = None if roles is None else list(validate_role_names(roles))
    if all(isinstance(p, TextPair) for p in plist):
        patch_pairs = to_patch_pairs(model, plist, roles=wanted)  # type: ignore[arg-type]
    elif all(isinstance(p, PatchPair) for p in plist):
        patch_pairs = plist  # type: ignore[assignment]
    else:
        raise EntitylensError("pairs mix TextPair and PatchPair items; pass one kind")
    check_tokens(model, patch_pairs)  # context length, tokenizer, vocabulary: before anything is written
    if grid == "layer_pos":
        return patch_pairs, None
    if wanted is None:
        if grid == "layer_head" and all(p.same_length for p in patch_pairs):
            return patch_pairs, None
        wanted = default_roles(patch_pairs)
    for i, p in enumerate(patch_pairs):
        for r in wanted:
            for side, m in (("clean", p.clean_roles), ("corrupted", p.corrupted_roles)):
                if r not in m:
                    raise EntitylensError(
                        f"pair {i} ({p.name}): role {r!r} is missing from the {side} side; drop it from --roles"
                    )
    return patch_pairs, wanted


CHUNK_PAIRS = 8
"""Pairs per resumable chunk of a patching run (see :func:`resumable`)."""


def concat_results(parts: Sequence[PatchResult]) -> PatchResult:
    """Join results of the same grid computed on consecutive groups of pairs (exact: pairs are independent)."""
    first = parts[0]
    for p in parts[1:]:
        if (p.kind, p.component, p.grid, p.path, p.layers, p.cells) != (
            first.kind, first.component, first.grid, first.path, first.layers, first.cells,
        ):  # fmt: skip
            raise EntitylensError("cannot join patch results of different grids; rerun with --overwrite")

    def cat(name: str) -> Any:
        values = [getattr(p, name) for p in parts]
        return None if any(v is None for v in values) else torch.cat(values)

    return dataclasses.replace(
        first,
        pair_names=tuple(n for p in parts for n in p.pair_names),
        normalised=cat("normalised"),
        logit_diff=cat("logit_diff"),
        prob=cat("prob"),
        top1=cat("top1"),
        source_logit_diff=cat("source_logit_diff"),
        target_logit_diff=cat("target_logit_diff"),
        source_prob=cat("source_prob"),
        target_prob=cat("target_prob"),
        n_forward_cells=sum(p.n_forward_cells for p in parts),
        n_noop_cells=sum(p.n_noop_cells for p in parts),
    )


def resumable(
    compute: Callable[[Sequence[PatchPair]], PatchResult],
    pairs: Sequence[PatchPair],
    partial_dir: str | os.PathLike[str] | None,
    settings: Mapping[str, Any],
    chunk_pairs: int | None = None,
) -> PatchResult:
    """Run ``compute`` on chunks of pairs, keeping each finished chunk on disk so a killed run resumes.

    Chunk ``i`` is saved as ``<partial_dir>/chunk_<i>.safetensors`` once computed, beside a
    ``settings.json`` (a hash of everything that determines the numbers: model, pairs, component, grid,
    roles, layers, engine). A rerun with the same settings reuses the finished chunks and computes the rest;
    other settings start afresh. The joined result equals a single uninterrupted run (pairs are
    independent), and the directory is deleted by the caller once the outputs are written.

    Args:
        compute: Patches a list of pairs.
        pairs: All pairs, in order.
        partial_dir: Where chunks live (``None``: no resume, one call).
        settings: What determines the numbers (JSON-ready).
        chunk_pairs: Pairs per chunk (default :data:`CHUNK_PAIRS`).

    Returns:
        The joined result.
    """
    if partial_dir is None:
        return compute(pairs)
    chunk_pairs = chunk_pairs or CHUNK_PAIRS
    d = Path(partial_dir)
    digest = sha256_json({**dict(settings), "pairs": [p.name for p in pairs], "chunk_pairs": chunk_pairs})
    settings_path = d / "settings.json"
    try:
        same = json.loads(settings_path.read_text(encoding="utf-8")).get("sha256") == digest
    except (OSError, ValueError):
        same = False
    if not same:
        shutil.rmtree(d, ignore_errors=True)
        write_json(settings_path, {"sha256": digest})
    parts = []
    for k, start in enumerate(range(0, len(pairs), chunk_pairs)):
        path = d / f"chunk_{k:05d}.safetensors"
        part = None
        if path.is_file():
            with contextlib.suppress(EntitylensError):
                part = PatchResult.load(path)
        if part is None:
            part = compute(pairs[start : start + chunk_pairs])
            part.save(path)
        parts.append(part)
    return concat_results(parts)


def patch_prepared(
    model: Any,
    plist: Sequence[PatchPair],
    cols: Sequence[str] | None,
    component: str,
    grid: str,
    *,
    layers: Sequence[int] | None = None,
    method: str = "fast",
    batch_cells: int = 32,
    partial_dir: str | os.PathLike[str] | None = None,
) -> PatchResult:
    """Exact patching of pairs already prepared by :func:`prepare_pairs` (``cols`` = its roles), resumably."""

    def compute(chunk: Sequence[PatchPair]) -> PatchResult:
        return patch_grid(model, chunk, component, grid, roles=cols, layers=layers, method=method,  # type: ignore[arg-type]
                          batch_cells=batch_cells)  # fmt: skip

    settings = {"model": model_fingerprint(model), "component": component, "grid": grid,
                "roles": None if cols is None else list(cols), "layers": None if layers is None else list(layers),
                "method": method}  # fmt: skip
    return resumable(compute, plist, partial_dir, settings)


def run_attribution_prepared(
    model: Any,
    plist: Sequence[PatchPair],
    cols: Sequence[str] | None,
    component: str,
    grid: str,
    *,
    layers: Sequence[int] | None = None,
) -> PatchResult:
    """Attribution patching of pairs already prepared by :func:`prepare_pairs`."""
    return attribution_grid(model, plist, component, grid, roles=cols, layers=layers)  # type: ignore[arg-type]


def run_cross_prepared(
    source: Any,
    target: Any,
    plist: Sequence[PatchPair],
    cols: Sequence[str] | None,
    component: str,
    grid: str,
    *,
    side: str = "clean",
    layers: Sequence[int] | None = None,
    method: str = "fast",
    batch_cells: int = 32,
    partial_dir: str | os.PathLike[str] | None = None,
) -> PatchResult:
    """Cross-model patching of pairs already prepared (for ``target``) by :func:`prepare_pairs`, resumably."""

    def compute(chunk: Sequence[PatchPair]) -> PatchResult:
        return cross_model_patch(
            source, target, chunk, component, grid, side=side, roles=cols, layers=layers, method=method,  # type: ignore[arg-type]
            batch_cells=batch_cells,
        )  # fmt: skip

    settings = {"source": model_fingerprint(source), "target": model_fingerprint(target), "component": component,
                "grid": grid, "side": side, "roles": None if cols is None else list(cols),
                "layers": None if layers is None else list(layers), "method": method}  # fmt: skip
    return resumable(compute, plist, partial_dir, settings)


def run_patching(
    model: Any,
    pairs: Sequence[TextPair] | Sequence[PatchPair],
    component: str = "resid_pre",
    grid: str | None = None,
    *,
    roles: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    method: str = "fast",
    batch_cells: int = 32,
    partial_dir: str | os.PathLike[str] | None = None,
) -> PatchResult:
    """Exact activation patching (clean -> corrupted) of every (layer x role) or (layer x head) cell.

    Args:
        model: A ``TransformerBridge``.
        pairs: Text pairs (tokenised here) or pre-tokenised pairs.
        component: ``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out`` or ``head_z``.
        grid: ``layer_role`` (default) or ``layer_head`` (default for ``head_z``).
        roles: Grid columns (``layer_role``) / patched positions (``layer_head``); see :func:`prepare_pairs`.
        layers: Grid rows (default all).
        method: ``fast`` or ``hooks`` (see :func:`~entitylens.patching.exact.patch_grid`).
        batch_cells: Most cells per forward.
        partial_dir: Keep finished chunks of pairs here so a killed run resumes (see :func:`resumable`).

    Returns:
        The :class:`PatchResult` (``kind="activation"``).
    """
    grid = grid or default_grid(component)
    plist, cols = prepare_pairs(model, pairs, grid, roles)
    return patch_prepared(model, plist, cols, component, grid, layers=layers, method=method,
                          batch_cells=batch_cells, partial_dir=partial_dir)  # fmt: skip


def run_attribution(
    model: Any,
    pairs: Sequence[TextPair] | Sequence[PatchPair],
    component: str = "resid_pre",
    grid: str | None = None,
    *,
    roles: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
) -> PatchResult:
    """Attribution patching over the same grid as :func:`run_patching` (2 forwards + 1 backward per pair)."""
    grid = grid or default_grid(component)
    plist, cols = prepare_pairs(model, pairs, grid, roles)
    return run_attribution_prepared(model, plist, cols, component, grid, layers=layers)


def run_cross(
    source: Any,
    target: Any,
    pairs: Sequence[TextPair] | Sequence[PatchPair],
    component: str = "resid_pre",
    grid: str | None = None,
    *,
    side: str = "clean",
    roles: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    method: str = "fast",
    batch_cells: int = 32,
    partial_dir: str | os.PathLike[str] | None = None,
) -> PatchResult:
    """Cross-model patching: model A's (``source``) activations into model B (``target``) on the same prompts.

    The metric is B's logit difference between the pair's two answers on the ``side`` prompt; the result's
    ``normalised`` is the fraction of A's behaviour that transfers (see
    :func:`~entitylens.patching.cross_model.cross_model_patch`). ``partial_dir`` makes the run resumable
    (see :func:`resumable`).
    """
    grid = grid or default_grid(component)
    plist, cols = prepare_pairs(target, pairs, grid, roles)
    return run_cross_prepared(source, target, plist, cols, component, grid, side=side, layers=layers,
                              method=method, batch_cells=batch_cells, partial_dir=partial_dir)  # fmt: skip
