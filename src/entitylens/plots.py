"""Figures: paper-style accuracy-by-numops lines, probe-by-layer lines, patching heatmaps.

All functions take plain data (no model objects), write PNG and PDF next to each other, and return the
paths written. Matplotlib runs on the non-interactive Agg backend.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from entitylens._io import atomic_write  # noqa: E402
from entitylens.errors import EntitylensError  # noqa: E402

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class CurvePoint:
    """One point of an accuracy curve with its 95% interval.

    Attributes:
        x: The bucket (number of operations, or layer).
        y: Accuracy in [0, 1].
        low: Lower end of the 95% interval.
        high: Upper end of the 95% interval.
        n: Items in the bucket.

    """

    x: int
    y: float
    low: float
    high: float
    n: int


def _save(fig: plt.Figure, out: str | os.PathLike[str], formats: Sequence[str]) -> list[Path]:
    return _save_atomic(fig, out, formats)


def plot_accuracy_by_numops(
    curves: Mapping[str, Sequence[CurvePoint]],
    panels: Sequence[Sequence[str]],
    out: str | os.PathLike[str],
    *,
    paper: Mapping[str, Sequence[float]] | None = None,
    title: str | None = None,
    formats: Sequence[str] = ("png", "pdf"),
    references: Mapping[str, Sequence[CurvePoint]] | None = None,
    interval: str = "95% interval",
    bucket_labels: Mapping[int, str] | None = None,
) -> list[Path]:
    """Paper-style figure: accuracy vs number of operations, one line per model with 95% bands.

    Every panel shares the x and y axes; baselines (``references``) are drawn in every panel as grey
    reference lines; the number of box rows behind each point is written under its x tick; the interval
    method is stated under the figure.

    Args:
        curves: Model label → points (one per numops bucket).
        panels: Model labels per panel, e.g. ``[("llama2-7b", "codellama-7b"), ...]`` (one panel per pair).
        out: Output path without extension (``.png`` / ``.pdf`` are added).
        paper: Optional model label → the paper's accuracy per numops (fractions), drawn dashed.
        title: Figure title (default: what the figure shows).
        formats: File formats to write.
        references: Baseline label → points, drawn in every panel (no bands).
        interval: How the bands were computed (for the caption).
        bucket_labels: Tick label per bucket (e.g. ``{7: "7+"}``).

    Returns:
        The files written.

    """
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(4.4 * n, 4.0), squeeze=False, sharey=True, sharex=True)
    refs = dict(references or {})
    all_x = sorted({p.x for pts in [*curves.values(), *refs.values()] for p in pts})
    if paper:
        shown = {m for ms in panels for m in ms}
        all_x = sorted(set(all_x) | {x for m, ys in paper.items() if m in shown for x in range(len(ys))})
    styles = (":", "-.", (0, (1, 3)), (0, (5, 2)))
    for ax, models in zip(axes[0], panels):
        n_by_x: dict[int, int] = {}
        for i, label in enumerate(models):
            pts = sorted(curves.get(label, ()), key=lambda p: p.x)
            if not pts:
                continue
            color = f"C{i}"
            xs = [p.x for p in pts]
            ax.plot(xs, [p.y for p in pts], marker="o", color=color, label=label)
            ax.fill_between(xs, [p.low for p in pts], [p.high for p in pts], color=color, alpha=0.2)
            for p in pts:
                n_by_x.setdefault(p.x, p.n)
            if paper and label in paper:
                ys = list(paper[label])
                ax.plot(range(len(ys)), ys, ls="--", color=color, alpha=0.7, label=f"{label} (paper)")
        for j, (label, ref_pts) in enumerate(sorted(refs.items())):
            if label in models:
                continue
            ref = sorted(ref_pts, key=lambda p: p.x)
            ax.plot([p.x for p in ref], [p.y for p in ref], color="0.45", lw=1.0, ls=styles[j % len(styles)],
                    label=f"{label} (baseline)")  # fmt: skip
            for p in ref:
                n_by_x.setdefault(p.x, p.n)
        ax.set_xticks(all_x)
        ax.set_xticklabels(
            [f"{(bucket_labels or {}).get(x, x)}\nn={n_by_x[x]}" if x in n_by_x else str(x) for x in all_x],
            fontsize=7,
        )
        ax.set_xlabel("operations that changed the queried box")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(" vs ".join(models), fontsize=9)
    axes[0][0].set_ylabel("accuracy (fraction of boxes right)")
    fig.suptitle(title or "Accuracy by number of operations on the queried box", fontsize=10, y=0.99)
    fig.text(0.5, 0.005, f"bands: {interval}; n = box rows per point", ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 0.98))
    return _save(fig, out, formats)


# ------------------------------------------------------------------------------------------------------
# Patching heatmaps (entitylens.patching / `entitylens patch`; this section belongs to the patching CLI)
# ------------------------------------------------------------------------------------------------------

PATCH_CMAP = "RdBu_r"
"""Diverging colormap of patching heatmaps: red = restores the clean behaviour, blue = pushes away, white = 0."""


def patch_color_limit(*grids: object) -> float:
    """Symmetric colour limit covering every value: ``max(1, max |finite value|)`` (the ``vmax="auto"`` scale).

    The default scale of the patching heatmaps is the fixed ``[-1, 1]`` (1 = full restoration always has
    the same colour; larger values saturate, the colour bar shows arrows and the cell text the value).
    """
    import numpy as np

    vmax = 1.0
    for g in grids:
        a = np.asarray(g, dtype=float)
        a = a[np.isfinite(a)]
        if a.size:
            vmax = max(vmax, float(np.abs(a).max()))
    return vmax


def _save_atomic(fig: plt.Figure, out: str | os.PathLike[str], formats: Sequence[str]) -> list[Path]:
    """Save ``fig`` in each format through a temporary file (no partial file, byte-stable PNG)."""
    import io


    out = Path(out)
    paths = []
    try:
        for fmt in formats:
            buf = io.BytesIO()
            meta = {"Software": None} if fmt == "png" else {"CreationDate": None} if fmt == "pdf" else None
            fig.savefig(buf, format=fmt, dpi=150, bbox_inches="tight", metadata=meta)
            p = out.parent / f"{out.name}.{fmt}"
            with atomic_write(p, "wb") as f:
                f.write(buf.getvalue())
            paths.append(p)
    finally:
        plt.close(fig)
    return paths


def _extend(values: object, vmax: float) -> str:
    import numpy as np

    a = np.asarray(values, dtype=float)
    a = a[np.isfinite(a)]
    lo, hi = bool(a.size and a.min() < -vmax), bool(a.size and a.max() > vmax)
    return "both" if lo and hi else "min" if lo else "max" if hi else "neither"


def _draw_patch_grid(
    ax: plt.Axes, values: object, layers: Sequence[int | str], cells: Sequence[str], vmax: float, annotate: bool | None,
    row_label: str = "layer",
) -> AxesImage:
    import numpy as np

    a = np.asarray(values, dtype=float)
    cmap = matplotlib.colormaps[PATCH_CMAP].with_extremes(bad="#d0d0d0")
    im = ax.imshow(np.ma.masked_invalid(a), cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels(list(cells), rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([str(x) for x in layers], fontsize=7)
    ax.set_ylabel(row_label)
    if annotate is None:
        annotate = a.size <= 240
    if annotate:
        for (i, j), v in np.ndenumerate(a):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if abs(v) > 0.6 * vmax else "black")  # fmt: skip
    return im


def plot_patch_heatmap(
    values: object,
    layers: Sequence[int | str],
    cells: Sequence[str],
    out: str | os.PathLike[str],
    *,
    title: str | None = None,
    vmax: float | None = 1.0,
    colorbar_label: str = "normalised (1 = clean, 0 = corrupted)",
    annotate: bool | None = None,
    formats: Sequence[str] = ("png",),
    row_label: str = "layer",
) -> list[Path]:
    """Heatmap of a patching grid: layers (rows) x roles or heads (columns), diverging colours centred at 0.

    Args:
        values: ``[layer, cell]`` array (``nan`` cells are grey).
        layers: Row labels.
        cells: Column labels (roles, positions or ``H{h}``).
        out: Output path without extension.
        title: Figure title.
        vmax: Symmetric colour limit (default 1: the scale ``[-1, 1]``); ``None`` = :func:`patch_color_limit`.
        colorbar_label: Colour bar label.
        annotate: Write each value in its cell (default: grids of at most 240 cells).
        formats: File formats to write.
        row_label: Label of the rows (``"sender"`` for path-patching grids).

    Returns:
        The files written.
    """
    vmax = patch_color_limit(values) if vmax is None else float(vmax)
    n_rows, n_cols = max(1, len(layers)), max(1, len(cells))
    fig, ax = plt.subplots(figsize=(min(18.0, 2.2 + 0.55 * n_cols), min(16.0, 1.6 + 0.28 * n_rows)))
    im = _draw_patch_grid(ax, values, layers, cells, vmax, annotate, row_label)
    fig.colorbar(im, ax=ax, label=colorbar_label, fraction=0.05, extend=_extend(values, vmax))
    if title:
        ax.set_title(title, fontsize=9)
    return _save_atomic(fig, out, formats)


def plot_patch_comparison(
    panels: Sequence[tuple[str, object, Sequence[int | str], Sequence[str]]],
    out: str | os.PathLike[str],
    *,
    title: str | None = None,
    vmax: float | None = 1.0,
    difference: bool = True,
    colorbar_label: str = "normalised (1 = clean, 0 = corrupted)",
    formats: Sequence[str] = ("png",),
    ylabel: str = "layer",
) -> list[Path]:
    """Patching heatmaps side by side on one colour scale (e.g. a base model and its code variant).

    Args:
        panels: ``(label, [layer, cell] values, layers, cells)`` per panel.
        out: Output path without extension.
        title: Figure title.
        vmax: Shared symmetric colour limit (default 1); ``None`` = :func:`patch_color_limit` over all panels.
        difference: With two panels on the same grid, add a third: second minus first (same scale).
        colorbar_label: Colour bar label.
        formats: File formats to write.
        ylabel: Label of the rows' axis (``"layer"``, or a relative depth for models of different depth).

    Returns:
        The files written.
    """
    import numpy as np

    panels = list(panels)
    if not panels:
        raise ValueError("plot_patch_comparison needs at least one panel")
    items = [(lab, np.asarray(v, dtype=float), list(ly), list(ce)) for lab, v, ly, ce in panels]
    if difference and len(items) == 2 and items[0][2:] == items[1][2:]:
        a, b = items
        items.append((f"{b[0]} - {a[0]}", b[1] - a[1], a[2], a[3]))
    vmax = patch_color_limit(*(v for _, v, _, _ in items)) if vmax is None else float(vmax)
    n_rows = max(len(ly) for _, _, ly, _ in items)
    n_cols = max(len(ce) for _, _, _, ce in items)
    width = min(9.0, 1.4 + 0.5 * n_cols)
    fig, axes = plt.subplots(1, len(items), figsize=(width * len(items) + 1.0, min(16.0, 1.6 + 0.28 * n_rows)),
                             squeeze=False)  # fmt: skip
    im: AxesImage | None = None
    for ax, (lab, v, ly, ce) in zip(axes[0], items):
        im = _draw_patch_grid(ax, v, ly, ce, vmax, None)
        ax.set_title(lab, fontsize=9)
        ax.set_ylabel(ylabel)
    ext = _extend(np.concatenate([v.ravel() for _, v, _, _ in items]), vmax)
    assert im is not None  # at least one panel
    fig.colorbar(im, ax=list(axes[0]), label=colorbar_label, fraction=0.03, extend=ext)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save_atomic(fig, out, formats)


# ------------------------------------------------------------------------------------------------------
# Probes (entitylens.probing.run / `entitylens probe`; this section belongs to the probe CLI)
# ------------------------------------------------------------------------------------------------------

_PROBE_MAIN = ("exact_match", "balanced_accuracy")


def _probe_rows(table: pd.DataFrame, role: str, metric: str) -> pd.DataFrame:
    return table[(table["role"] == role) & (table["metric"] == metric)]


def _probe_n(table: pd.DataFrame, role: str, metric: str) -> int:
    rows = _probe_rows(table, role, metric)
    return int(rows["n"].iloc[0]) if len(rows) else 0


def _probe_series(
    table: pd.DataFrame, role: str, metric: str
) -> tuple[list[int], list[float], list[float], list[float]]:
    rows = _probe_rows(table, role, metric).sort_values("layer", kind="stable")
    xs = [int(x) for x in rows["layer"]]
    ys, lo, hi = ([float(v) for v in rows[c]] for c in ("value", "ci_low", "ci_high"))  # blank intervals: NaN
    return xs, ys, lo, hi


def _probe_roles(table: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(table["role"]))


def plot_probe_by_layer(
    table: pd.DataFrame,
    out: str | os.PathLike[str],
    *,
    metrics: Sequence[str] = _PROBE_MAIN,
    title: str | None = None,
    formats: Sequence[str] = ("png",),
) -> list[Path]:
    """Probe metrics vs layer: one panel per metric, one line per role with its 95% band; selectivity dashed.

    Args:
        table: A probe DataFrame (columns ``layer, role, metric, value, ci_low, ci_high, n``) from
            :func:`entitylens.probing.run.run_probes` or :func:`~entitylens.probing.outputs.read_probe_table`.
        out: Output path without suffix (``.../probe_by_layer``).
        metrics: Metrics to draw, one panel each (those absent from the table are skipped).
        title: Figure title.
        formats: File formats.

    Returns:
        The written paths (written atomically, byte-stable PNG).
    """
    present = set(table["metric"])
    panels = [m for m in metrics if m in present]
    if not panels:
        raise EntitylensError(f"the probe table has none of the metrics {list(metrics)}; pass a probe table")
    roles = _probe_roles(table)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 3.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes[0], panels, strict=True):
        for k, role in enumerate(roles):
            col = colors[k % len(colors)]
            xs, ys, lo, hi = _probe_series(table, role, metric)
            n = _probe_n(table, role, metric)
            ax.plot(xs, ys, marker="o", ms=3, color=col, label=f"{role} (n={n})")
            ax.fill_between(xs, lo, hi, color=col, alpha=0.2, linewidth=0)
            if metric.startswith("exact_match"):
                for b, ls in (("baseline_majority", ":"), ("baseline_sibling_lookup", "-.")):
                    bx, by, _, _ = _probe_series(table, role, b + metric[len("exact_match"):])
                    if bx:
                        ax.plot(bx, by, ls=ls, lw=0.9, color=col,
                                label=f"{role} {b.removeprefix('baseline_').replace('_', ' ')} baseline")  # fmt: skip
            if metric == "balanced_accuracy" and "selectivity" in present:
                sx, sy, slo, shi = _probe_series(table, role, "selectivity")
                ax.plot(sx, sy, linestyle="--", color=col, label=f"{role} selectivity")
                ax.fill_between(sx, slo, shi, color=col, alpha=0.1, linewidth=0)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric.replace("_", " "))
        ax.axhline(0.0, color="0.7", linewidth=0.5)
        ax.set_ylim(-0.05 if metric != "balanced_accuracy" or "selectivity" not in present else -0.55, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or "Linear probes by layer", fontsize=10)
    fig.text(0.5, 0.005, "bands: 95% (exact match: Wilson on the clustered effective n; means: bootstrap over test "
             "scenarios); n = test rows", ha="center", fontsize=7)  # fmt: skip
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _save_atomic(fig, out, formats)


def plot_probe_compare(
    tables: Mapping[str, pd.DataFrame],
    out: str | os.PathLike[str],
    *,
    metric: str = "exact_match",
    title: str | None = None,
    formats: Sequence[str] = ("png",),
    x_scales: Mapping[str, float] | None = None,
) -> list[Path]:
    """Two (or more) probe runs on one figure: one panel per role, one colour per run.

    The first row draws ``metric`` with its 95% band; for exact-match metrics each run's majority-set and
    sibling-lookup baselines are drawn as thin lines of its colour. When every run has ``selectivity`` (and
    ``metric`` is not it), a second row draws selectivity on its own axis. Only lines actually drawn get a
    legend entry.

    Args:
        tables: Run name (e.g. ``"base"``, ``"code"``) -> probe table.
        out: Output path without suffix (``.../probe_compare``).
        metric: Metric drawn solid with its 95% band.
        title: Figure title (default: the metric).
        formats: File formats.
        x_scales: Run name -> factor turning its layer numbers into the x axis (``1 / (layers - 1)`` for a
            relative-depth axis); ``None``: layer numbers.

    Returns:
        The written paths.
    """
    if len(tables) < 2:
        raise EntitylensError("compare needs at least two probe runs; pass base and variant")
    roles: list[str] = []
    for t in tables.values():
        roles += [r for r in _probe_roles(t) if r not in roles]
    with_sel = metric != "selectivity" and all((t["metric"] == "selectivity").any() for t in tables.values())
    n_rows = 2 if with_sel else 1
    fig, axes = plt.subplots(n_rows, len(roles), figsize=(5.0 * len(roles), 3.4 * n_rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    xlabel = "relative depth (layer / (layers - 1))" if x_scales else "layer"
    names = [m.replace("_", " ") for m in (metric, "selectivity")]
    for c, role in enumerate(roles):
        for row, (m, label) in enumerate(zip((metric, "selectivity")[:n_rows], names)):
            ax = axes[row][c]
            for k, (name, t) in enumerate(tables.items()):
                col = colors[k % len(colors)]
                scale = (x_scales or {}).get(name, 1.0)
                xs, ys, lo, hi = _probe_series(t, role, m)
                if not xs:
                    continue
                xs_scaled = [x * scale for x in xs]
                n = _probe_n(t, role, m)
                ax.plot(xs_scaled, ys, marker="o", ms=3, color=col, label=f"{name} (n={n})")
                ax.fill_between(xs_scaled, lo, hi, color=col, alpha=0.2, linewidth=0)
                if m.startswith("exact_match"):
                    for b, ls in (("baseline_majority", ":"), ("baseline_sibling_lookup", "-.")):
                        bm = b + m[len("exact_match"):]
                        bx, by, _, _ = _probe_series(t, role, bm)
                        if bx:
                            ax.plot([x * scale for x in bx], by, ls=ls, lw=0.9, color=col,
                                    label=f"{name} {b.removeprefix('baseline_').replace('_', ' ')}")  # fmt: skip
            ax.set_title(role, fontsize=9)
            ax.set_xlabel(xlabel)
            if not x_scales:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(label)
            ax.axhline(0.0, color="0.7", linewidth=0.5)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.suptitle(title or f"probe {names[0]}: " + " vs ".join(tables) + " (bands: 95%)", fontsize=10)
    fig.tight_layout()
    return _save_atomic(fig, out, formats)


def plot_intervention(table: pd.DataFrame, out: str | os.PathLike[str], title: str = "",
                      formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Effect of an intervention along a probe direction per layer, against random directions.

    One panel per metric: the probe direction's mean effect (edited - clean) with its 95% interval, and the
    random directions' mean effect with the band between their 2.5% and 97.5% quantiles.

    Args:
        table: ``intervene.csv`` as a DataFrame (columns layer, direction, metric, effect, ci_low, ci_high).
        out: Output path without extension.
        title: Figure title.
        formats: File formats.

    Returns:
        The written paths.
    """
    metrics = list(dict.fromkeys(table["metric"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for direction, color in (("random", "0.55"), ("probe", "C3")):
            rows = table[(table["metric"] == metric) & (table["direction"] == direction)].sort_values("layer")
            if rows.empty:
                continue
            x = rows["layer"].to_numpy()
            label = "probe direction" if direction == "probe" else "random directions (2.5-97.5%)"
            ax.plot(x, rows["effect"].to_numpy(), marker="o", color=color, label=label)
            ax.fill_between(x, rows["ci_low"].to_numpy(dtype=float), rows["ci_high"].to_numpy(dtype=float),
                            color=color, alpha=0.2, linewidth=0)
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_title(metric)
        ax.set_xlabel("layer")
        ax.set_ylabel("edited - clean")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save_atomic(fig, out, formats)


def _num(v: object) -> float:
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


def plot_iia(runs: Mapping[str, pd.DataFrame], out: str | os.PathLike[str], title: str = "",
             formats: Sequence[str] = ("png",)) -> list[Path]:
    """Interchange-intervention accuracy by layer, one line per run (held-out solid, training dashed).

    Args:
        runs: Label -> ``das.csv`` as a DataFrame (columns layer, train_iia, test_iia).
        out: Output path without extension.
        title: Figure title.
        formats: File formats.

    Returns:
        The written paths.
    """
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for i, (label, table) in enumerate(runs.items()):
        rows = table.sort_values("layer")
        x = rows["layer"].to_numpy()
        test, train = (np.array([_num(v) for v in rows[c]]) for c in ("test_iia", "train_iia"))
        ax.plot(x, test, marker="o", color=f"C{i}", label=f"{label} (held-out)")
        ax.plot(x, train, linestyle="--", color=f"C{i}", alpha=0.6, label=f"{label} (train)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("layer")
    ax.set_ylabel("interchange-intervention accuracy")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save_atomic(fig, out, formats)
