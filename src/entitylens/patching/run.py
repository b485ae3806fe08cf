"""Patching runs from text pairs, and their outputs (CSV, heatmaps, safetensors, agreement, manifest).

:func:`run_patching` / :func:`run_attribution` / :func:`run_cross` tokenise :class:`~entitylens.patching.pairs.TextPair`
s for the model (or take pre-tokenised :class:`~entitylens.patching.exact.PatchPair` s), choose the grid's
roles and call the engine (:func:`~entitylens.patching.exact.patch_grid`,
:func:`~entitylens.patching.attribution.attribution_grid`,
:func:`~entitylens.patching.cross_model.cross_model_patch`). :func:`write_patch_outputs` writes a result
into a run directory:

======================================= ==============================================================
``patch.csv`` / ``cross.csv``           long format: one row per (pair or ``mean``, layer, cell); every
                                        component run into the directory keeps its own rows
``patch_<c>.png`` / ``cross_<c>.png``   heatmap of the pair-averaged normalised metric
``result_<c>.safetensors``              the :class:`~entitylens.patching.exact.PatchResult` (``cross_<c>``
                                        for cross-model, ``attribution_<c>`` for attribution)
``attribution_<c>.png``                 the attribution estimate, same grid and colour scale
``agreement.json``                      per component: Pearson, Spearman, top-k overlap vs exact
``run.json``                            what ran: model(s), tokenizer fingerprint, pairs file and hash,
                                        engine, layers, cells, counts, seconds, files
======================================= ==============================================================

A run directory belongs to one model (or model pair) and one pairs file: writing another model's or
another pairs file's results into it is refused unless ``overwrite`` (nothing already written is lost).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from entitylens._io import clean_stale_temps, sha256_json, write_json, write_timing
from entitylens.errors import EntitylensError
from entitylens.patching.attribution import agreement, attribution_grid
from entitylens.patching.cross_model import cross_model_patch
from entitylens.patching.exact import COMPONENTS, PatchPair, PatchResult, patch_grid
from entitylens.patching.pairs import TextPair, default_roles, to_patch_pairs, validate_role_names
from entitylens.table import Table, read_csv

__all__ = [
    "CSV_COLUMNS",
    "check_run_dir",
    "compare_patch_runs",
    "default_grid",
    "prepare_pairs",
    "read_manifest",
    "result_table",
    "run_attribution",
    "run_cross",
    "run_label",
    "run_patching",
    "top_cells_summary",
    "write_patch_outputs",
]

RESULT_STEMS: dict[str, str] = {"activation": "result", "attribution": "attribution", "cross_model": "cross"}
"""Result file stem of each result kind (the ``kind`` column of ``patch.csv`` / ``cross.csv``)."""

KIND_ALIASES: dict[str, str] = {"patch": "activation", "exact": "activation", "cross": "cross_model"}
"""Short names ``patch compare --kind`` also accepts."""
"""File stem of each result kind in a run directory (``result_<component>.safetensors`` ...)."""

CSV_COLUMNS: tuple[str, ...] = (
    "kind",
    "component",
    "grid",
    "path",
    "pair",
    "pair_name",
    "layer",
    "cell",
    "normalised",
    "ci_low",
    "ci_high",
    "n_pairs",
    "logit_diff",
    "prob",
    "top1",
    "source_logit_diff",
    "target_logit_diff",
    "source_prob",
    "target_prob",
)
"""Columns of ``patch.csv`` / ``cross.csv``. ``pair`` is ``mean`` for pair-averaged rows (``normalised`` is the
mean over pairs with a 95% normal interval ``ci_low..ci_high``; ``top1`` the fraction of pairs) or the pair's
index. ``source_*`` / ``target_*`` are the unpatched baselines (clean / corrupted run; model A / model B)."""

Z95 = 1.959963984540054


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
        from entitylens.patching.exact import _check_tokens

        _check_tokens(model, patch_pairs)
    else:
        raise EntitylensError("pairs mix TextPair and PatchPair items; pass one kind")
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


def _fingerprint(model: Any) -> str:
    from entitylens.activations.cache import model_fingerprint

    return str(model_fingerprint(model))


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

    def compute(chunk: Sequence[PatchPair]) -> PatchResult:
        return patch_grid(model, chunk, component, grid, roles=cols, layers=layers, method=method,  # type: ignore[arg-type]
                          batch_cells=batch_cells)  # fmt: skip

    settings = {"model": _fingerprint(model), "component": component, "grid": grid, "roles": cols,
                "layers": None if layers is None else list(layers), "method": method}  # fmt: skip
    return resumable(compute, plist, partial_dir, settings)


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
    return attribution_grid(model, plist, component, grid, roles=cols, layers=layers)  # type: ignore[arg-type]


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

    def compute(chunk: Sequence[PatchPair]) -> PatchResult:
        return cross_model_patch(
            source, target, chunk, component, grid, side=side, roles=cols, layers=layers, method=method,  # type: ignore[arg-type]
            batch_cells=batch_cells,
        )  # fmt: skip

    settings = {"source": _fingerprint(source), "target": _fingerprint(target), "component": component,
                "grid": grid, "side": side, "roles": cols, "layers": None if layers is None else list(layers),
                "method": method}  # fmt: skip
    return resumable(compute, plist, partial_dir, settings)


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------


def _f(x: Any) -> float | None:
    v = float(x)
    return None if math.isnan(v) else v


def _mean_ci(values: torch.Tensor) -> tuple[float | None, float | None, float | None, int]:
    v = values[torch.isfinite(values)].double()
    n = int(v.numel())
    if n == 0:
        return None, None, None, 0
    m = float(v.mean())
    if n < 2:
        return m, None, None, n
    half = Z95 * float(v.std(unbiased=True)) / math.sqrt(n)
    return m, m - half, m + half, n


def result_table(result: PatchResult) -> Table:
    """The long-format table of a result: pair-averaged rows (``pair = "mean"``) then one row per pair and cell.

    Columns: :data:`CSV_COLUMNS`. Mean rows average every finite value over pairs (``top1``: fraction of
    pairs whose clean answer is top-1); the 95% interval of the normalised metric is
    ``mean +- 1.96 * sd / sqrt(n)`` (blank for fewer than two pairs).
    """
    base = {"kind": result.kind, "component": result.component, "grid": result.grid, "path": result.path}
    rows: list[dict[str, Any]] = []
    n_pairs = len(result.pair_names)
    src_ld, dst_ld = result.source_logit_diff.float(), result.target_logit_diff.float()
    src_pr, dst_pr = result.source_prob.float(), result.target_prob.float()

    def nanmean(t: torch.Tensor) -> float | None:
        t = t.float()
        t = t[torch.isfinite(t)]
        return None if t.numel() == 0 else float(t.double().mean())

    for li, layer in enumerate(result.layers):
        for ci, cell in enumerate(result.cells):
            m, lo, hi, n = _mean_ci(result.normalised[:, li, ci])
            rows.append({
                **base, "pair": "mean", "pair_name": "", "layer": layer, "cell": cell,
                "normalised": m, "ci_low": lo, "ci_high": hi, "n_pairs": n,
                "logit_diff": nanmean(result.logit_diff[:, li, ci]),
                "prob": None if result.prob is None else nanmean(result.prob[:, li, ci]),
                "top1": None if result.top1 is None else nanmean(result.top1[:, li, ci].float()),
                "source_logit_diff": nanmean(src_ld), "target_logit_diff": nanmean(dst_ld),
                "source_prob": nanmean(src_pr), "target_prob": nanmean(dst_pr),
            })  # fmt: skip
    for pi in range(n_pairs):
        for li, layer in enumerate(result.layers):
            for ci, cell in enumerate(result.cells):
                norm = _f(result.normalised[pi, li, ci])
                rows.append({
                    **base, "pair": pi, "pair_name": result.pair_names[pi], "layer": layer, "cell": cell,
                    "normalised": norm, "ci_low": None, "ci_high": None,
                    "n_pairs": 0 if norm is None else 1,
                    "logit_diff": _f(result.logit_diff[pi, li, ci]),
                    "prob": None if result.prob is None else _f(result.prob[pi, li, ci]),
                    "top1": None if result.top1 is None else bool(result.top1[pi, li, ci]),
                    "source_logit_diff": _f(src_ld[pi]), "target_logit_diff": _f(dst_ld[pi]),
                    "source_prob": _f(src_pr[pi]), "target_prob": _f(dst_pr[pi]),
                })  # fmt: skip
    return Table(CSV_COLUMNS, tuple(rows))


# --------------------------------------------------------------------------------------------------
# Run directories
# --------------------------------------------------------------------------------------------------


def read_manifest(out: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A patch run directory's ``run.json`` (``None`` when there is none yet).

    Args:
        out: The run directory.

    Returns:
        The parsed manifest, or ``None``.

    Raises:
        EntitylensError: The file exists but is not valid JSON.
    """
    path = Path(out) / "run.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise EntitylensError(f"{path} is not valid JSON; delete it or pass --overwrite") from None
    return data if isinstance(data, dict) else None


def check_run_dir(out: str | os.PathLike[str], identity: Mapping[str, Any], overwrite: bool = False) -> None:
    """Refuse to mix another model's or pairs file's results into ``out`` (call before computing).

    With ``overwrite`` the files an earlier run listed in ``run.json`` are deleted and the manifest reset.

    Args:
        out: The run directory.
        identity: What makes results comparable (model/tokenizer fingerprints, pairs hash, ...).
        overwrite: Replace an incompatible earlier run instead of refusing.

    Raises:
        EntitylensError: ``out`` is a file, or holds results of another identity (without ``overwrite``).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EntitylensError(f"--out {out} is a file; give a directory such as runs/patch/MODEL")
    clean_stale_temps(out)
    old = read_manifest(out)
    if old is None:
        return
    if dict(old.get("identity", {})) == json.loads(json.dumps(dict(identity))):
        return
    if not overwrite:
        diff = sorted(k for k in set(old.get("identity", {})) | set(identity)
                      if old.get("identity", {}).get(k) != identity.get(k))  # fmt: skip
        raise EntitylensError(
            f"{out} holds results of another run (different {', '.join(diff) or 'identity'}); "
            f"use another --out or pass --overwrite"
        )
    for entry in (old.get("results") or {}).values():
        for name in entry.get("files", []):
            p = out / name
            if p.is_file() and p.parent == out:
                p.unlink()
    (out / "run.json").unlink()


def _merge_csv(path: Path, table: Table, key: tuple[str, str, str]) -> None:
    kept: list[Mapping[str, Any]] = []
    if path.is_file():
        old = read_csv(path)
        kept = [r for r in old.rows if (r.get("kind"), r.get("component"), r.get("grid")) != key]
    Table(table.columns, tuple(kept) + table.rows).to_csv(path)


def _heatmap_title(result: PatchResult, label: str, what: str) -> str:
    n = len(result.pair_names)
    return f"{label + ': ' if label else ''}{what} {result.component} ({n} pair{'s' if n != 1 else ''})"


def write_patch_outputs(
    out: str | os.PathLike[str],
    result: PatchResult,
    *,
    attribution: PatchResult | None = None,
    k: int = 10,
    label: str = "",
    identity: Mapping[str, Any] | None = None,
    info: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    vmax: float | None = 1.0,
    timing: Mapping[str, float] | None = None,
) -> dict[str, Path]:
    """Write a patching (or cross-model) result, and optionally its attribution estimate, into a run directory.

    Args:
        out: Run directory (created).
        result: ``kind="activation"`` (exact patching) or ``kind="cross_model"``.
        attribution: The attribution result on the same grid (exact patching only): adds its rows to
            ``patch.csv``, ``attribution_<c>.png``, ``attribution_<c>.safetensors`` and ``agreement.json``.
        k: Top-k size for the agreement's overlap.
        label: Model label shown in heatmap titles.
        identity: What must match earlier results in ``out`` (see :func:`check_run_dir`); stored in ``run.json``.
        info: Extra fields for this result's ``run.json`` entry (e.g. roles, model specs).
        timing: Wall-clock seconds of this result (written to ``timing.json``, never to ``run.json``, so a
            rerun gives byte-identical artifacts).
        overwrite: Replace an incompatible earlier run.
        vmax: Symmetric colour limit of the heatmaps (default 1: ``[-1, 1]``, exact and attribution on the same
            scale); ``None`` = the largest absolute value of both.

    Returns:
        Name -> path of every file written.

    Raises:
        EntitylensError: an attribution result on another grid, a result kind that is not written here, or an
            incompatible run directory.
    """
    from entitylens.plots import patch_color_limit, plot_patch_heatmap

    out = Path(out)
    identity = dict(identity or {})
    check_run_dir(out, identity, overwrite)
    if result.kind not in ("activation", "cross_model"):
        raise EntitylensError(f"write_patch_outputs takes an activation or cross_model result, not {result.kind!r}")
    c = result.component
    stem = "patch" if result.kind == "activation" else "cross"
    files: dict[str, Path] = {}
    tensors = out / (f"result_{c}.safetensors" if stem == "patch" else f"cross_{c}.safetensors")
    result.save(tensors)
    files["result"] = tensors
    table = result_table(result)
    csv_path = out / f"{stem}.csv"
    _merge_csv(csv_path, table, (result.kind, c, result.grid))
    files["csv"] = csv_path
    grids = [result.mean()]
    if attribution is not None:
        if attribution.kind != "attribution" or (
            attribution.layers,
            attribution.cells,
            attribution.component,
        ) != (
            result.layers,
            result.cells,
            result.component,
        ):
            raise EntitylensError(
                "the attribution result is not on the exact result's grid; run both with the same component, "
                "layers and roles"
            )
        grids.append(attribution.mean())
    vmax = patch_color_limit(*grids) if vmax is None else float(vmax)
    what = "activation patching" if stem == "patch" else "cross-model transfer"
    cbar = "normalised (1 = clean, 0 = corrupted)" if stem == "patch" else "transfer (1 = behaves like A)"
    png = plot_patch_heatmap(
        grids[0].numpy(), result.layers, result.cells, out / f"{stem}_{c}",
        title=_heatmap_title(result, label, what), vmax=vmax, colorbar_label=cbar,
    )[0]  # fmt: skip
    files["heatmap"] = png
    entry: dict[str, Any] = {
        "kind": result.kind,
        "component": c,
        "grid": result.grid,
        "path": result.path,
        "layers": list(result.layers),
        "cells": list(result.cells),
        "n_pairs": len(result.pair_names),
        "n_forward_cells": result.n_forward_cells,
        "n_noop_cells": result.n_noop_cells,
        **dict(info or {}),
    }
    if attribution is not None:
        a_tensors = out / f"attribution_{c}.safetensors"
        attribution.save(a_tensors)
        files["attribution_result"] = a_tensors
        _merge_csv(csv_path, result_table(attribution), ("attribution", c, attribution.grid))
        files["attribution_heatmap"] = plot_patch_heatmap(
            grids[1].numpy(), attribution.layers, attribution.cells, out / f"attribution_{c}",
            title=_heatmap_title(attribution, label, "attribution patching"), vmax=vmax,
            colorbar_label="estimated normalised (1 = clean, 0 = corrupted)",
        )[0]  # fmt: skip
        agree = {
            "pair_mean": agreement(result, attribution, k=k),
            "per_pair": agreement(result, attribution, k=k, per_pair=True),
            "exact_path": result.path,
            "attribution_path": attribution.path,
            "grid": result.grid,
            "n_pairs": len(result.pair_names),
        }
        agree_path = out / "agreement.json"
        old = {}
        if agree_path.is_file():
            try:
                old = json.loads(agree_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                old = {}
        old[c] = _json_safe(agree)
        write_json(agree_path, old)
        files["agreement"] = agree_path
        entry["agreement"] = _json_safe(agree["pair_mean"])
    entry["files"] = sorted({p.name for p in files.values()})
    manifest = read_manifest(out) or {"identity": identity, "results": {}}
    manifest["identity"] = identity
    manifest.setdefault("results", {})[f"{stem}/{c}"] = _json_safe(entry)
    write_json(out / "run.json", manifest)
    files["manifest"] = out / "run.json"
    if timing:
        write_timing(out, f"{stem}/{c}", {k: round(float(v), 3) for k, v in timing.items()})
    return files


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else obj
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------- comparing runs


def top_cells_summary(result: PatchResult, top: int = 5) -> str:
    """The ``top`` cells of a result's pair-averaged metric, one indented line each (for terminal output).

    Args:
        result: A :class:`~entitylens.patching.exact.PatchResult`.
        top: How many cells.

    Returns:
        Lines ``"  layer   L  cell  +0.123"``, best first, or a note when no cell is finite.
    """
    mean = result.mean()
    flat = torch.where(torch.isfinite(mean), mean, torch.full_like(mean, float("-inf"))).flatten()
    k = min(top, int(torch.isfinite(mean).sum()))
    if k == 0:
        return "  no finite cells (the two baselines coincide for every pair)"
    idx = flat.topk(k).indices.tolist()
    n_cells = len(result.cells)
    lines = [
        f"  layer {result.layers[i // n_cells]:>3}  {result.cells[i % n_cells]:<20} {float(flat[i]):+.3f}" for i in idx
    ]
    return "\n".join(lines)


def run_label(run_dir: str | os.PathLike[str]) -> str:
    """A run directory's model label from its ``run.json`` (``"A -> B"`` for cross-model; else its name).

    The label recorded by ``patch run --label`` wins; otherwise :func:`entitylens.models.model_label` of the
    recorded spec, the label every other command uses.
    """
    run_dir = Path(run_dir)
    path = run_dir / "run.json"
    if path.is_file():
        try:
            results = json.loads(path.read_text(encoding="utf-8")).get("results", {})
        except (OSError, ValueError):
            results = {}
        from entitylens.models.loading import model_label

        for entry in results.values():
            if entry.get("label"):
                return str(entry["label"])
            if entry.get("model"):
                return model_label(str(entry["model"]))
            if entry.get("source"):
                return f"{model_label(entry['source'])} -> {model_label(entry['target'])}"
    return run_dir.name


def run_depth(run_dir: str | os.PathLike[str]) -> int:
    """The number of layers of a patch run's model (``n_layers`` in ``run.json``; else the largest layer + 1)."""
    run_dir = Path(run_dir)
    try:
        results = json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get("results", {})
    except (OSError, ValueError):
        results = {}
    depths = {int(e["n_layers"]) for e in results.values() if e.get("n_layers")}
    if depths:
        return max(depths)
    layers = [int(x) for e in results.values() for x in e.get("layers", [])]
    return max(layers) + 1 if layers else 0


def _interpolate_depth(values: Tensor, layers: Sequence[int], depth: int, at_layers: Sequence[int],
                       at_depth: int) -> Tensor:
    """``values[layer, cell]`` of one model, linearly interpolated at another model's relative depths."""
    src = torch.tensor([x / max(1, depth - 1) for x in layers], dtype=torch.float64)
    out = torch.empty(len(at_layers), values.shape[1], dtype=values.dtype)
    for i, x in enumerate(at_layers):
        r = x / max(1, at_depth - 1)
        j = int(torch.searchsorted(src, torch.tensor(r, dtype=torch.float64)).clamp(1, max(1, len(src) - 1)))
        if len(src) == 1:
            out[i] = values[0]
            continue
        lo_r, hi_r = float(src[j - 1]), float(src[j])
        w = 0.0 if hi_r == lo_r else min(1.0, max(0.0, (r - lo_r) / (hi_r - lo_r)))
        out[i] = (1 - w) * values[j - 1] + w * values[j]
    return out


def _components(run_dir: Path, stem: str) -> set[str]:
    return {p.name[len(stem) + 1 : -len(".safetensors")] for p in run_dir.glob(f"{stem}_*.safetensors")}


def _result_path(run_dir: Path, stem: str, comp: str) -> Path:
    p = run_dir / f"{stem}_{comp}.safetensors"
    if not p.is_file():
        raise EntitylensError(f"{p} does not exist; run this component into {run_dir} first")
    return p


def compare_patch_runs(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    kind: str = "activation",
    components: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    vmax: float | None = 1.0,
    say: Any = None,
    depth: str = "layer",
) -> tuple[list[Path], Table]:
    """Draw two run directories' heatmaps side by side on one colour scale, and tabulate both.

    Models of different depth (Gemma-3-270M's 18 layers against Qwen2.5-0.5B's 24) cannot be subtracted layer
    by layer: that would compare one model's last layer with the other's middle. With ``depth="layer"``
    (default) such runs are refused; ``depth="relative"`` puts both on the relative depth
    ``layer / (layers - 1)``: the deeper model's values are interpolated linearly at the shallower model's
    relative depths, the difference is taken there, and the figure's and table's rows are relative depths.

    Args:
        a: First run directory (e.g. the base model's ``entitylens patch run --out``).
        b: Second run directory (e.g. the code model's).
        out: Output directory: ``compare_<component>.png``/``.pdf`` and ``compare.csv`` (columns ``kind``,
            ``component``, ``layer``, ``cell``, ``a``, ``b``, ``b_minus_a``; pair-averaged metrics).
        kind: A ``kind`` of ``patch.csv``: ``"activation"`` (exact; alias ``"patch"``), ``"attribution"`` or
            ``"cross_model"`` (alias ``"cross"``). ``compare.csv`` uses the same names.
        components: Components to compare (default: every one both runs have).
        labels: Two panel labels (default: the runs' model labels).
        vmax: Colour-scale limit (``None``: from both results).
        say: Optional callable for one progress line.
        depth: ``"layer"`` or ``"relative"`` (see above).

    Returns:
        The files written (figures, then ``compare.csv``, whose ``relative_depth`` column is filled with
        ``depth="relative"``) and the table.

    Raises:
        EntitylensError: Unknown kind, missing run directories or results, or bad labels.
    """
    from entitylens.plots import patch_color_limit, plot_patch_comparison

    a, b, out = Path(a), Path(b), Path(out)
    if depth not in ("layer", "relative"):
        raise EntitylensError(f"unknown --depth {depth!r}; use layer or relative")
    kind = KIND_ALIASES.get(kind, kind)
    if kind not in RESULT_STEMS:
        raise EntitylensError(
            f"unknown --kind {kind!r}; use a kind of patch.csv: activation, attribution or cross_model "
            "(or patch / cross)"
        )
    stem = RESULT_STEMS[kind]
    for d in (a, b):
        if not d.is_dir():
            raise EntitylensError(f"run directory {d} does not exist; pass the --out of `entitylens patch run`")
    if out.exists() and not out.is_dir():
        raise EntitylensError(f"--out {out} is a file; give a directory")
    names = list(labels) if labels else [run_label(a), run_label(b)]
    if len(names) != 2:
        raise EntitylensError(f"--labels needs two labels (got {len(names)}), e.g. --labels base,code")
    if names[0] == names[1]:
        names = [f"{names[0]} (A)", f"{names[1]} (B)"]
    comps = list(components) if components else sorted(_components(a, stem) & _components(b, stem))
    if not comps:
        raise EntitylensError(
            f"{a} and {b} have no {kind} result for a common component; run the same --component into both first"
        )
    rows = []
    written: list[Path] = []
    depth_a, depth_b = run_depth(a), run_depth(b)
    if depth == "layer" and depth_a != depth_b:
        raise EntitylensError(
            f"{names[0]} has {depth_a} layers and {names[1]} {depth_b}: a layer-by-layer difference would compare "
            "different depths; pass --depth relative (layer / (layers - 1), interpolated)"
        )
    for comp in comps:
        ra = PatchResult.load(_result_path(a, stem, comp))
        rb = PatchResult.load(_result_path(b, stem, comp))
        ma, mb = ra.mean(), rb.mean()
        limit = patch_color_limit(ma, mb) if vmax is None else vmax
        cbar = "transfer (1 = behaves like A)" if kind == "cross_model" else "normalised (1 = clean, 0 = corrupted)"
        if depth == "relative":
            la = [f"{x / max(1, depth_a - 1):.2f}" for x in ra.layers]
            lb = [f"{x / max(1, depth_b - 1):.2f}" for x in rb.layers]
            ylabel = "relative depth (layer / (layers - 1))"
        else:
            la, lb, ylabel = list(ra.layers), list(rb.layers), "layer"
        panels = [(names[0], ma.numpy(), la, ra.cells), (names[1], mb.numpy(), lb, rb.cells)]
        if depth == "relative":
            mb_on_a = _interpolate_depth(mb, rb.layers, depth_b, ra.layers, depth_a)
            if ra.cells == rb.cells:
                panels.append((f"{names[1]} - {names[0]}", (mb_on_a - ma).numpy(), la, ra.cells))
        written += plot_patch_comparison(
            panels, out / f"compare_{comp}", title=f"{kind} {comp}: {names[0]} vs {names[1]}", vmax=limit,
            colorbar_label=cbar, difference=depth == "layer", ylabel=ylabel,
        )  # fmt: skip
        b_index = {(layer, cell): (li, ci) for li, layer in enumerate(rb.layers) for ci, cell in enumerate(rb.cells)}
        b_cells = {cell: ci for ci, cell in enumerate(rb.cells)}
        for li, layer in enumerate(ra.layers):
            for ci, cell in enumerate(ra.cells):
                va = float(ma[li, ci])
                if depth == "relative":
                    j2 = b_cells.get(cell)
                    vb = float(mb_on_a[li, ci]) if j2 is not None and ra.cells == rb.cells else float("nan")
                    rel: float | None = layer / max(1, depth_a - 1)
                else:
                    j = b_index.get((layer, cell))
                    vb = float(mb[j]) if j is not None else float("nan")
                    rel = None
                rows.append({"kind": kind, "component": comp, "layer": layer, "relative_depth": rel, "cell": cell,
                             "a": va, "b": vb, "b_minus_a": vb - va})  # fmt: skip
    table = Table(("kind", "component", "layer", "relative_depth", "cell", "a", "b", "b_minus_a"), tuple(rows))
    table.to_csv(out / "compare.csv")
    if say is not None:
        say(f"compared {len(comps)} component(s): {names[0]} (a) vs {names[1]} (b)")
    return [*written, out / "compare.csv"], table

