"""The outputs of a patching run (CSV, heatmaps, safetensors, agreement, manifest) and its run directory.

:func:`write_patch_outputs` writes a result of :mod:`entitylens.patching.run` into a run directory:

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

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from entitylens._io import RunDir, write_json, write_timing
from entitylens.errors import EntitylensError
from entitylens.frames import frame, read_csv, write_csv
from entitylens.patching.attribution import agreement
from entitylens.patching.types import PatchResult
from entitylens.plots import patch_color_limit, plot_patch_heatmap

__all__ = [
    "CSV_COLUMNS",
    "check_run_dir",
    "read_manifest",
    "result_table",
    "top_cells_summary",
    "write_patch_outputs",
]

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


def result_table(result: PatchResult) -> pd.DataFrame:
    """The long-format table of a result: pair-averaged rows (``pair = "mean"``) then one row per pair and cell.

    A DataFrame with columns :data:`CSV_COLUMNS` (``pair`` and ``top1`` mix kinds, so they are ``object``).
    Mean rows average every finite value over pairs (``top1``: fraction of pairs whose clean answer is top-1);
    the 95% interval of the normalised metric is ``mean +- 1.96 * sd / sqrt(n)`` (blank for fewer than two pairs).
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
    return frame(rows, CSV_COLUMNS)


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


def check_run_dir(out: str | os.PathLike[str], identity: Mapping[str, Any], overwrite: bool = False) -> bool:
    """Refuse to mix another model's or pairs file's results into ``out`` (call before computing).

    The run directory's contract is :class:`~entitylens._io.RunDir`'s; with ``overwrite`` the files an earlier
    run listed in ``run.json`` are deleted and the manifest reset.

    Args:
        out: The run directory.
        identity: What makes results comparable (model/tokenizer fingerprints, pairs hash, ...).
        overwrite: Replace an incompatible earlier run instead of refusing.

    Returns:
        Whether ``out`` already holds results of this identity.

    Raises:
        EntitylensError: ``out`` is a file, or holds results of another identity (without ``overwrite``).
    """
    out = Path(out)

    def remove_listed(old: Mapping[str, Any]) -> None:
        for entry in (old.get("results") or {}).values():
            for name in entry.get("files", []):
                p = out / name
                if p.is_file() and p.parent == out:
                    p.unlink()
        (out / "run.json").unlink()  # the manifest starts afresh

    run_dir = RunDir(out, "run.json", "a patch run", is_mine=lambda rec: "identity" in rec and "results" in rec)
    return run_dir.check(identity, overwrite=overwrite, on_replace=remove_listed)


def _merge_csv(path: Path, table: pd.DataFrame, key: tuple[str, str, str]) -> None:
    """Write ``table`` to ``path`` after the rows of other (kind, component, grid) already there (kept as text)."""
    if path.is_file():
        old = read_csv(path).reindex(columns=table.columns)
        kept = old[[k != key for k in zip(old["kind"], old["component"], old["grid"], strict=True)]]
        if len(kept):
            table = pd.concat([kept, table], ignore_index=True)
    write_csv(table, path)


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
        _check_same_grid(result, attribution)
        grids.append(attribution.mean())
    vmax = patch_color_limit(*grids) if vmax is None else float(vmax)
    what = "activation patching" if stem == "patch" else "cross-model transfer"
    cbar = "normalised (1 = clean, 0 = corrupted)" if stem == "patch" else "transfer (1 = behaves like A)"
    png = plot_patch_heatmap(
        grids[0].numpy(), result.layers, result.cells, out / f"{stem}_{c}",
        title=_heatmap_title(result, label, what), vmax=vmax, colorbar_label=cbar,
    )[0]  # fmt: skip
    files["heatmap"] = png
    entry = _manifest_entry(result, info)
    if attribution is not None:
        entry["agreement"] = _write_attribution(out, result, attribution, csv_path, files, k=k, label=label, vmax=vmax)
    entry["files"] = sorted({p.name for p in files.values()})
    files["manifest"] = _record_in_manifest(out, identity, f"{stem}/{c}", entry)
    if timing:
        write_timing(out, f"{stem}/{c}", {k: round(float(v), 3) for k, v in timing.items()})
    return files


def _manifest_entry(result: PatchResult, info: Mapping[str, Any] | None) -> dict[str, Any]:
    """A result's ``run.json`` entry: what ran (grid, engine, counts) and the caller's ``info``."""
    return {
        "kind": result.kind,
        "component": result.component,
        "grid": result.grid,
        "path": result.path,
        "layers": list(result.layers),
        "cells": list(result.cells),
        "n_pairs": len(result.pair_names),
        "n_forward_cells": result.n_forward_cells,
        "n_noop_cells": result.n_noop_cells,
        **dict(info or {}),
    }


def _record_in_manifest(out: Path, identity: dict[str, Any], key: str, entry: Mapping[str, Any]) -> Path:
    """Put ``entry`` under ``key`` in ``out/run.json`` (keeping the other results), stamped with ``identity``."""
    manifest = read_manifest(out) or {"identity": identity, "results": {}}
    manifest["identity"] = identity
    manifest.setdefault("results", {})[key] = _json_safe(entry)
    write_json(out / "run.json", manifest)
    return out / "run.json"


def _check_same_grid(result: PatchResult, attribution: PatchResult) -> None:
    """Refuse an attribution result that is not on the exact result's grid."""
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


def _write_attribution(
    out: Path,
    result: PatchResult,
    attribution: PatchResult,
    csv_path: Path,
    files: dict[str, Path],
    *,
    k: int,
    label: str,
    vmax: float,
) -> Any:
    """Write the attribution estimate beside the exact result and merge its agreement into ``agreement.json``.

    Adds ``attribution_<c>.safetensors``, its rows of ``csv_path`` and ``attribution_<c>.png`` (on the exact
    heatmap's colour scale ``vmax``); records every written file in ``files``.

    Returns:
        The pair-averaged agreement, JSON-safe (for the ``run.json`` entry).
    """
    c = result.component
    a_tensors = out / f"attribution_{c}.safetensors"
    attribution.save(a_tensors)
    files["attribution_result"] = a_tensors
    _merge_csv(csv_path, result_table(attribution), ("attribution", c, attribution.grid))
    files["attribution_heatmap"] = plot_patch_heatmap(
        attribution.mean().numpy(), attribution.layers, attribution.cells, out / f"attribution_{c}",
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
    return _json_safe(agree["pair_mean"])


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else obj
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


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
