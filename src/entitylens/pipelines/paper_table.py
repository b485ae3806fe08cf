"""The paper table: our accuracy overall and by numops beside KST24's, per model and per (base, variant) pair.

:func:`paper_table` builds it from a run's ``summary.csv`` and ``comparison.csv``;
:func:`paper_table_markdown` renders ``ours / paper`` cells; :func:`write_paper_table` writes
``paper_table.csv`` and ``paper_table.md`` into a finished (or merged, or sharded) run directory.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from entitylens._io import atomic_write
from entitylens.errors import EntitylensError
from entitylens.frames import frame, read_csv, records, write_csv

__all__ = ["NUMOPS_COLUMNS", "PAPER_TABLE_COLUMNS", "paper_table", "paper_table_markdown", "write_paper_table"]

NUMOPS_COLUMNS: tuple[str, ...] = tuple(str(k) for k in range(8))
"""The per-numops columns of the paper table (numops 0..7; our last bucket is ``7+``)."""

PAPER_TABLE_COLUMNS: tuple[str, ...] = (
    "kind", "model", "spec", "base", "variant", "n", "ours_overall", "paper_overall",
    *(c for k in NUMOPS_COLUMNS for c in (f"ours_{k}", f"paper_{k}")), "p_value",
)  # fmt: skip
"""Columns of ``paper_table.csv``. Model rows (``kind=model``): accuracy in percent. Pair rows
(``kind=pair``, ``model = "variant - base"``): variant minus base in percentage points, and the p-value of
the overall difference (``comparison.csv``'s ``p_value``: the exact paired test over states). ``paper_*`` is
blank where the paper has no number."""


def _num(v: Any) -> float | None:
    if v is None or v == "":
        return None
    x = float(v)
    return None if math.isnan(x) else x


def _pct(v: Any) -> float | None:
    x = _num(v)
    return None if x is None else 100.0 * x


def _bucket_column(bucket: str) -> str | None:
    b = str(bucket).rstrip("+")
    return b if b in NUMOPS_COLUMNS else None


def paper_table(summary: pd.DataFrame, comparison: pd.DataFrame | None = None) -> pd.DataFrame:
    """Our numbers beside the paper's: one row per model, then one row per (base, variant) pair.

    Args:
        summary: A run's ``summary.csv`` (:func:`entitylens.behavior.runs.summary_table`, or read back with
            :func:`entitylens.frames.read_csv`): accuracies as fractions, ``paper_accuracy`` where known.
        comparison: The run's ``comparison.csv`` (:func:`entitylens.behavior.runs.compare`), or None.

    Returns:
        A :data:`PAPER_TABLE_COLUMNS` table. Model rows hold accuracies in percent (bucket ``7+`` goes to
        column ``7``); pair rows hold variant − base in percentage points, ours from the paired comparison
        and the paper's from the two models' paper numbers (blank unless both are known), with the overall
        p-value (the exact paired test over states).

    """
    models: dict[str, dict[str, Any]] = {}
    for r in records(summary):
        name = r["model"]
        row = models.setdefault(name, {"kind": "model", "model": name, "spec": r.get("spec") or name})
        bucket = str(r["bucket"])
        if bucket == "overall":
            row["n"] = int(float(r["n"]))
            row["ours_overall"] = _pct(r["accuracy"])
            row["paper_overall"] = _pct(r.get("paper_accuracy"))
        elif (col := _bucket_column(bucket)) is not None:
            row[f"ours_{col}"] = _pct(r["accuracy"])
            row[f"paper_{col}"] = _pct(r.get("paper_accuracy"))
    rows: list[dict[str, Any]] = list(models.values())
    pairs: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records(comparison) if comparison is not None else ():
        base, variant = r["base"], r["variant"]
        if (base, variant) not in pairs:
            pairs[(base, variant)] = {
                "kind": "pair",
                "model": f"{variant} - {base}",
                "base": base,
                "variant": variant,
                "spec": f"{models.get(variant, {}).get('spec', variant)} - {models.get(base, {}).get('spec', base)}",
            }
        row = pairs[(base, variant)]
        bucket = str(r["bucket"])
        key = "overall" if bucket == "overall" else _bucket_column(bucket)
        if key is None:
            continue
        row[f"ours_{key}"] = _pct(r["difference"])
        if key == "overall":
            row["n"] = int(float(r["n"]))
            row["p_value"] = _num(r.get("p_value"))
    for (base, variant), row in pairs.items():
        for key in ("overall", *NUMOPS_COLUMNS):
            pb, pv = models.get(base, {}).get(f"paper_{key}"), models.get(variant, {}).get(f"paper_{key}")
            row[f"paper_{key}"] = None if pb is None or pv is None else pv - pb
    rows.extend(pairs.values())
    return frame(rows, PAPER_TABLE_COLUMNS)


def _n(r: dict[str, Any]) -> str:
    return "" if r.get("n") is None else str(r["n"])


def _cell(ours: Any, paper: Any, signed: bool = False) -> str:
    def f(x: Any) -> str:
        if x is None or x == "":
            return "–"
        return f"{float(x):+.1f}" if signed else f"{float(x):.1f}"

    return f"{f(ours)} / {f(paper)}"


def paper_table_markdown(table: pd.DataFrame, title: str = "") -> str:
    """Render :func:`paper_table` as Markdown: ``ours / paper`` cells, one table for models, one for pairs."""
    head = ["overall", *NUMOPS_COLUMNS[:-1], f"{NUMOPS_COLUMNS[-1]}+"]
    lines = [f"# {title}", ""] if title else []
    rows = records(table)
    models = [r for r in rows if r.get("kind") == "model"]
    pairs = [r for r in rows if r.get("kind") == "pair"]
    lines += [
        "Accuracy in % as `ours / paper` (– where the paper has no number), overall and by numops "
        "(operations that changed the queried box).", "",
        "| model | n | " + " | ".join(head) + " |", "|---|---:|" + "---:|" * len(head),
    ]  # fmt: skip
    for r in models:
        cells = [_cell(r.get("ours_overall"), r.get("paper_overall"))]
        cells += [_cell(r.get(f"ours_{k}"), r.get(f"paper_{k}")) for k in NUMOPS_COLUMNS]
        lines.append(f"| {r['model']} | {_n(r)} | " + " | ".join(cells) + " |")
    if pairs:
        lines += [
            "", "Variant − base in percentage points as `ours / paper`; p = exact paired test over states of the "
            "overall difference (the 7 boxes of a state are one unit).", "",
            "| variant − base | n | p | " + " | ".join(head) + " |", "|---|---:|---:|" + "---:|" * len(head),
        ]  # fmt: skip
        for r in pairs:
            p = _num(r.get("p_value"))
            cells = [_cell(r.get("ours_overall"), r.get("paper_overall"), True)]
            cells += [_cell(r.get(f"ours_{k}"), r.get(f"paper_{k}"), True) for k in NUMOPS_COLUMNS]
            ps = "" if p is None else f"{p:.3g}"
            lines.append(f"| {r['variant']} − {r['base']} | {_n(r)} | {ps} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_paper_table(run_dir: str | os.PathLike[str], title: str = "") -> pd.DataFrame:
    """Build the paper table from a finished run directory's CSV files and write ``paper_table.csv/.md``.

    Reads ``summary.csv`` and (if present) ``comparison.csv``, so it works the same on an unsharded run,
    a shard and a merged run.

    Args:
        run_dir: The run directory.
        title: Heading of ``paper_table.md``.

    Returns:
        The table.

    Raises:
        EntitylensError: The directory has no ``summary.csv``.

    """
    run_dir = Path(run_dir)
    if not (run_dir / "summary.csv").is_file():
        raise EntitylensError(f"{run_dir} has no summary.csv; finish the run (or merge its shards) first")
    comp = run_dir / "comparison.csv"
    table = paper_table(read_csv(run_dir / "summary.csv"), read_csv(comp) if comp.is_file() else None)
    write_csv(table, run_dir / "paper_table.csv", digits=4)
    with atomic_write(run_dir / "paper_table.md") as f:
        f.write(paper_table_markdown(table, title))
    return table
