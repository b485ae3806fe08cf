"""Result tables as ``pandas.DataFrame``: building them with stable dtypes, and their CSV and Markdown text.

Every results table entitylens returns (``summary_table``, ``compare``, ``paper_table``, ``result_table``,
probe tables, study summaries) is a DataFrame built by :func:`frame`. On disk a table is CSV written by
:func:`write_csv`, whose format does not depend on pandas: floats with a fixed number of decimals, missing
values blank, booleans ``true``/``false``, ints as ints, Unix line endings, the header in column order.
:func:`read_csv` reads such a file back with every value a string (blanks ``""``); :func:`markdown_table`
renders a table for the terminal.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
from pandas.api.types import is_bool, is_float, is_integer

from entitylens._io import atomic_write

__all__ = ["csv_text", "frame", "markdown_table", "read_csv", "records", "write_csv"]


def _missing(v: Any) -> bool:
    return v is None or v is pd.NA or v is pd.NaT or (is_float(v) and math.isnan(v))


def _kind(v: Any) -> str:
    if is_bool(v):
        return "bool"
    if is_integer(v):
        return "int"
    if is_float(v):
        return "float"
    return "str" if isinstance(v, str) else "object"


def _column(values: list[Any]) -> pd.Series:
    """One column with the dtype its values share: ints stay ints even with blanks; mixed kinds stay objects."""
    present = [v for v in values if not _missing(v)]
    kinds = {_kind(v) for v in present}
    some_missing = len(present) < len(values)
    dtypes = {"int": "Int64" if some_missing else "int64", "float": "float64",
              "bool": "boolean" if some_missing else "bool"}  # fmt: skip
    if len(kinds) == 1 and (kind := kinds.pop()) in dtypes:
        return pd.Series([None if _missing(v) else v for v in values], dtype=dtypes[kind])
    if kinds == {"str"}:
        return pd.Series(values)
    return pd.Series(values, dtype=object)


def frame(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> pd.DataFrame:
    """A DataFrame of ``rows`` with exactly ``columns``, in that order (a key a row lacks is blank).

    Each column gets the dtype its values share: ints ``int64`` (nullable ``Int64`` when some are missing,
    never float), floats ``float64`` (missing: NaN), booleans ``bool``/``boolean``, strings pandas' string
    dtype. A column whose values are of different kinds (``"mean"`` beside pair indices, floats beside
    booleans) stays ``object``, so each value keeps its type and :func:`write_csv` writes it as before.

    Args:
        rows: One mapping per row.
        columns: Column names, in order.

    Returns:
        The DataFrame (a fresh ``RangeIndex``).
    """
    rows = list(rows)
    cols = list(columns)
    return pd.DataFrame({c: _column([r.get(c) for r in rows]) for c in cols}, columns=cols)


def records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows of ``df`` as plain dicts, in order, with every missing value (NaN, NA, None) as ``None``."""
    cols = list(df.columns)
    return [{c: None if _missing(v) else v for c, v in zip(cols, row)} for row in df.itertuples(index=False, name=None)]


def _fmt(v: Any, digits: int) -> str:
    if _missing(v):
        return ""
    if is_bool(v):
        return "true" if v else "false"
    if is_float(v):
        return f"{float(v):.{digits}f}"
    if is_integer(v):
        return str(int(v))
    return str(v)


def csv_text(df: pd.DataFrame, digits: int = 6) -> str:
    """The CSV text of ``df`` (the format of every CSV file entitylens writes; the index is not written).

    The header is the columns; floats get ``digits`` decimals, missing values (None, NaN, NA) are blank,
    booleans ``true``/``false``, ints and strings are written as they are; lines end in a newline only.
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(list(df.columns))
    for row in df.itertuples(index=False, name=None):
        w.writerow([_fmt(v, digits) for v in row])
    return buf.getvalue()


def write_csv(df: pd.DataFrame, path: str | os.PathLike[str], digits: int = 6) -> None:
    """Write :func:`csv_text` of ``df`` to ``path`` atomically (a failed write leaves ``path`` as it was)."""
    text = csv_text(df, digits)
    with atomic_write(path) as f:
        f.write(text)


def read_csv(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a CSV file (e.g. one :func:`write_csv` wrote) with every value a string and blanks as ``""``."""
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:  # not even a header
        return pd.DataFrame()


def markdown_table(df: pd.DataFrame, columns: Sequence[str] | None = None, digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table of the chosen columns (default: all), without a trailing newline.

    Cells are formatted as in :func:`csv_text` with ``digits`` decimals; a column ``df`` lacks is blank.
    """
    cols = list(columns or df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.reindex(columns=cols).itertuples(index=False, name=None):
        lines.append("| " + " | ".join(_fmt(v, digits) for v in row) + " |")
    return "\n".join(lines)
