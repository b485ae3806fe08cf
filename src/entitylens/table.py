"""A minimal DataFrame-like table: named columns, rows as dicts, CSV / Markdown output.

entitylens avoids a pandas dependency; :meth:`Table.to_pandas` converts when pandas is installed.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from entitylens._io import atomic_write


def _fmt(v: Any, digits: int) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


@dataclass(frozen=True)
class Table:
    """Rows with a fixed column order.

    Attributes:
        columns: Column names, in order.
        rows: One mapping per row (missing keys are blank).

    """

    columns: tuple[str, ...]
    rows: tuple[Mapping[str, Any], ...]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        return iter(self.rows)

    def column(self, name: str) -> list[Any]:
        """All values of one column."""
        return [r.get(name) for r in self.rows]

    def where(self, **equals: Any) -> Table:
        """Rows whose columns equal the given values."""
        return Table(self.columns, tuple(r for r in self.rows if all(r.get(k) == v for k, v in equals.items())))

    def to_csv(self, path: str | os.PathLike[str] | None = None, digits: int = 6) -> str:
        """CSV text (floats with ``digits`` decimals); also written atomically to ``path`` if given."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.columns)
        for r in self.rows:
            w.writerow([_fmt(r.get(c), digits) for c in self.columns])
        text = buf.getvalue()
        if path is not None:
            with atomic_write(path) as f:
                f.write(text)
        return text

    def to_markdown(self, columns: Sequence[str] | None = None, digits: int = 3) -> str:
        """A GitHub-flavoured Markdown table of the chosen columns."""
        cols = tuple(columns or self.columns)
        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        for r in self.rows:
            lines.append("| " + " | ".join(_fmt(r.get(c), digits) for c in cols) + " |")
        return "\n".join(lines)

    def to_pandas(self) -> Any:
        """A ``pandas.DataFrame`` (requires pandas)."""
        import pandas as pd

        return pd.DataFrame([{c: r.get(c) for c in self.columns} for r in self.rows], columns=list(self.columns))

    def __str__(self) -> str:
        return self.to_markdown()


def read_csv(path: str | os.PathLike[str]) -> Table:
    """Read a CSV written by :meth:`Table.to_csv` (values stay strings)."""
    with open(path, newline="", encoding="utf-8") as f:
        r = csv.DictReader(f)
        rows = tuple(dict(row) for row in r)
        return Table(tuple(r.fieldnames or ()), rows)
