"""Comparing two patching run directories: side-by-side heatmaps and a table, layer by layer or by relative depth.

:func:`compare_patch_runs` reads the ``<stem>_<component>.safetensors`` results two runs of
:mod:`entitylens.patching.run` wrote (:data:`RESULT_STEMS`), draws them on one colour scale and tabulates them
with their difference. Models of different depth are compared on the relative depth ``layer / (layers - 1)``
(:func:`run_depth`, :func:`interpolate_depth`); :func:`run_label` names a run by its model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from entitylens.errors import EntitylensError
from entitylens.frames import frame, write_csv
from entitylens.models.loading import model_label
from entitylens.patching.types import PatchResult
from entitylens.plots import patch_color_limit, plot_patch_comparison

__all__ = [
    "KIND_ALIASES",
    "RESULT_STEMS",
    "compare_patch_runs",
    "interpolate_depth",
    "run_depth",
    "run_label",
]

RESULT_STEMS: dict[str, str] = {"activation": "result", "attribution": "attribution", "cross_model": "cross"}
"""Result file stem of each result kind (the ``kind`` column of ``patch.csv`` / ``cross.csv``)."""

KIND_ALIASES: dict[str, str] = {"patch": "activation", "exact": "activation", "cross": "cross_model"}
"""Short names ``patch compare --kind`` also accepts."""


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


def interpolate_depth(
    values: Tensor, layers: Sequence[int], depth: int, at_layers: Sequence[int], at_depth: int
) -> Tensor:
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
) -> tuple[list[Path], pd.DataFrame]:
    """Draw two run directories' heatmaps side by side on one colour scale, and tabulate both.

    Models of different depth (Gemma-3-270M's 18 layers against Qwen2.5-0.5B's 24) cannot be subtracted layer
    by layer: that would compare one model's last layer with the other's middle. With ``depth="layer"``
    (default) such runs are refused, ``depth="auto"`` picks ``"layer"`` for equal depths and ``"relative"``
    otherwise (the studies use it); ``depth="relative"`` puts both on the relative depth
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
        depth: ``"layer"``, ``"relative"`` or ``"auto"`` (see above).

    Returns:
        The files written (figures, then ``compare.csv``, whose ``relative_depth`` column is filled with
        ``depth="relative"``) and the table (a DataFrame).

    Raises:
        EntitylensError: Unknown kind, missing run directories or results, or bad labels.
    """
    a, b, out = Path(a), Path(b), Path(out)
    kind, stem = _check_compare_args(a, b, out, kind, depth)
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
    rows: list[dict[str, Any]] = []
    written: list[Path] = []
    depth_a, depth_b = run_depth(a), run_depth(b)
    if depth == "auto":
        depth = "layer" if depth_a == depth_b else "relative"
    if depth == "layer" and depth_a != depth_b:
        raise EntitylensError(
            f"{names[0]} has {depth_a} layers and {names[1]} {depth_b}: a layer-by-layer difference would compare "
            "different depths; pass --depth relative (layer / (layers - 1), interpolated)"
        )
    for comp in comps:
        ra = PatchResult.load(_result_path(a, stem, comp))
        rb = PatchResult.load(_result_path(b, stem, comp))
        ma, mb = ra.mean(), rb.mean()
        mb_on_a = interpolate_depth(mb, rb.layers, depth_b, ra.layers, depth_a) if depth == "relative" else None
        written += _plot_comparison(out / f"compare_{comp}", f"{kind} {comp}: {names[0]} vs {names[1]}", kind, names,
                                    (ra, rb), (ma, mb), mb_on_a, (depth_a, depth_b), vmax)  # fmt: skip
        rows += _comparison_rows(kind, comp, (ra, rb), (ma, mb), mb_on_a, depth_a)
    table = frame(rows, ("kind", "component", "layer", "relative_depth", "cell", "a", "b", "b_minus_a"))
    write_csv(table, out / "compare.csv")
    if say is not None:
        say(f"compared {len(comps)} component(s): {names[0]} (a) vs {names[1]} (b)")
    return [*written, out / "compare.csv"], table


def _check_compare_args(a: Path, b: Path, out: Path, kind: str, depth: str) -> tuple[str, str]:
    """Refuse an unknown depth or kind, a missing run directory or an ``out`` that is a file.

    Returns:
        The kind (aliases resolved) and its result file stem.
    """
    if depth not in ("layer", "relative", "auto"):
        raise EntitylensError(f"unknown --depth {depth!r}; use layer or relative")
    kind = KIND_ALIASES.get(kind, kind)
    if kind not in RESULT_STEMS:
        raise EntitylensError(
            f"unknown --kind {kind!r}; use a kind of patch.csv: activation, attribution or cross_model "
            "(or patch / cross)"
        )
    for d in (a, b):
        if not d.is_dir():
            raise EntitylensError(f"run directory {d} does not exist; pass the --out of `entitylens patch run`")
    if out.exists() and not out.is_dir():
        raise EntitylensError(f"--out {out} is a file; give a directory")
    return kind, RESULT_STEMS[kind]


def _plot_comparison(
    stem: Path,
    title: str,
    kind: str,
    names: Sequence[str],
    results: tuple[PatchResult, PatchResult],
    means: tuple[Tensor, Tensor],
    mb_on_a: Tensor | None,
    depths: tuple[int, int],
    vmax: float | None,
) -> list[Path]:
    """One component's figure: both runs' pair-averaged grids and, where defined, their difference.

    With ``mb_on_a`` (run B interpolated at run A's relative depths) the rows are relative depths and the
    difference panel is drawn only when both runs have the same cells; otherwise rows are layers and the
    plot takes the layer-by-layer difference itself.
    """
    (ra, rb), (ma, mb), (depth_a, depth_b) = results, means, depths
    limit = patch_color_limit(ma, mb) if vmax is None else vmax
    cbar = "transfer (1 = behaves like A)" if kind == "cross_model" else "normalised (1 = clean, 0 = corrupted)"
    if mb_on_a is not None:
        la = [f"{x / max(1, depth_a - 1):.2f}" for x in ra.layers]
        lb = [f"{x / max(1, depth_b - 1):.2f}" for x in rb.layers]
        ylabel = "relative depth (layer / (layers - 1))"
    else:
        la, lb, ylabel = [str(x) for x in ra.layers], [str(x) for x in rb.layers], "layer"
    panels = [(names[0], ma.numpy(), la, ra.cells), (names[1], mb.numpy(), lb, rb.cells)]
    if mb_on_a is not None and ra.cells == rb.cells:
        panels.append((f"{names[1]} - {names[0]}", (mb_on_a - ma).numpy(), la, ra.cells))
    return plot_patch_comparison(
        panels, stem, title=title, vmax=limit, colorbar_label=cbar, difference=mb_on_a is None, ylabel=ylabel,
    )  # fmt: skip


def _comparison_rows(
    kind: str,
    comp: str,
    results: tuple[PatchResult, PatchResult],
    means: tuple[Tensor, Tensor],
    mb_on_a: Tensor | None,
    depth_a: int,
) -> list[dict[str, Any]]:
    """One component's rows of ``compare.csv``: every cell of run A beside run B's value there.

    Run B's value is its same (layer, cell), or with ``mb_on_a`` its interpolation at A's relative depth
    (``nan`` when the runs' cells differ).
    """
    (ra, rb), (ma, mb) = results, means
    rows = []
    b_index = {(layer, cell): (li, ci) for li, layer in enumerate(rb.layers) for ci, cell in enumerate(rb.cells)}
    b_cells = {cell: ci for ci, cell in enumerate(rb.cells)}
    for li, layer in enumerate(ra.layers):
        for ci, cell in enumerate(ra.cells):
            va = float(ma[li, ci])
            if mb_on_a is not None:
                j2 = b_cells.get(cell)
                vb = float(mb_on_a[li, ci]) if j2 is not None and ra.cells == rb.cells else float("nan")
                rel: float | None = layer / max(1, depth_a - 1)
            else:
                j = b_index.get((layer, cell))
                vb = float(mb[j]) if j is not None else float("nan")
                rel = None
            rows.append({"kind": kind, "component": comp, "layer": layer, "relative_depth": rel, "cell": cell,
                         "a": va, "b": vb, "b_minus_a": vb - va})  # fmt: skip
    return rows
