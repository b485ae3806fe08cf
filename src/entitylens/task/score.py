"""Score parsed statements against gold contents and aggregate accuracy (KST24 protocol, DESIGN §2).

* A box row is correct when its predicted contents equal the gold contents: by default as *sets*
  (order-insensitive, ``"nothing"`` = ``"is empty"`` = empty set); in ``"strict"`` mode the raw per-box
  string must equal the gold phrase exactly (``"the a and the b"`` in gold (alphabetical) order, or
  ``"nothing"``). An :data:`~entitylens.task.parse.INVALID` box is wrong in both modes.
* Accuracy is reported per ``numops`` bucket (0 .. ``max_numops``, the last bucket pooling every row with
  ``numops >= max_numops``: "7+"), overall (mean over all rows) and per state (all boxes of a state right),
  each with a 95% interval: the Wilson score interval on the effective sample size, the box rows being
  clustered by state (:func:`entitylens.stats.clustered_wilson`; ``nan`` when ``n == 0``).

No torch here: records are plain Python values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from entitylens.errors import EntitylensError
from entitylens.stats import Z95, clustered_wilson, wilson_interval
from entitylens.task.parse import INVALID, BoxPrediction, ParsedStatement
from entitylens.task.prompts import box_phrase

ScoreMode = Literal["set", "strict"]
SCORE_MODES: tuple[str, ...] = ("set", "strict")

Z_95 = Z95
"""Normal quantile of the 95% interval."""


def _check_mode(mode: str) -> None:
    if mode not in SCORE_MODES:
        raise EntitylensError(f"unknown score mode {mode!r}; use 'set' (default) or 'strict'")


def box_correct(
    predicted: BoxPrediction, gold: Sequence[str], *, raw: str | None = None, mode: ScoreMode = "set"
) -> bool:
    """Whether one box's prediction is right.

    Args:
        predicted: Parsed objects of the box, or :data:`~entitylens.task.parse.INVALID`.
        gold: Gold objects of the box (alphabetical).
        raw: The box's raw string (``ParsedStatement.raw[box]``); needed by ``"strict"`` mode.
        mode: ``"set"``: equal as sets; ``"strict"``: ``raw`` equals :func:`box_phrase` of ``gold``.

    Returns:
        True when correct.

    """
    _check_mode(mode)
    if predicted is INVALID:
        return False
    if mode == "set":
        return set(predicted) == set(gold)
    return raw is not None and raw == box_phrase(tuple(gold))


def score_statement(
    parsed: ParsedStatement, gold: Sequence[Sequence[str]], *, mode: ScoreMode = "set"
) -> tuple[bool, ...]:
    """Per-box correctness of one parsed statement.

    Args:
        parsed: Output of :func:`~entitylens.task.parse.parse_statement`.
        gold: Gold contents of every box (``State.contents``).
        mode: ``"set"`` or ``"strict"`` (see :func:`box_correct`).

    Returns:
        One bool per box.

    """
    _check_mode(mode)
    if len(gold) != len(parsed.boxes):
        raise EntitylensError(
            f"statement parsed into {len(parsed.boxes)} boxes but gold has {len(gold)}; parse with num_boxes=len(gold)"
        )
    return tuple(box_correct(p, g, raw=r, mode=mode) for p, g, r in zip(parsed.boxes, gold, parsed.raw, strict=True))


@dataclass(frozen=True)
class RowScore:
    """One scored (state, box) row: the unit accuracy is computed over.

    Attributes:
        state: Key of the state the row belongs to (e.g. ``State.state_id``).
        box: The box index.
        numops: Operations in the prompt that changed this box.
        correct: Whether the prediction was right.

    """

    state: str
    box: int
    numops: int
    correct: bool

    def __post_init__(self) -> None:
        if isinstance(self.numops, bool) or not isinstance(self.numops, int) or self.numops < 0:
            raise EntitylensError(f"row {self.state}/{self.box}: numops {self.numops!r} must be an integer >= 0")
        object.__setattr__(self, "correct", bool(self.correct))


def score_state(
    parsed: ParsedStatement,
    gold: Sequence[Sequence[str]],
    numops: Sequence[int],
    state: str,
    *,
    mode: ScoreMode = "set",
) -> tuple[RowScore, ...]:
    """Score one state's statement into per-box :class:`RowScore` records.

    Args:
        parsed: The parsed statement.
        gold: Gold contents per box (``State.contents``).
        numops: Per-box operation counts (``State.numops``).
        state: State key (``State.state_id``).
        mode: ``"set"`` or ``"strict"``.

    Returns:
        One record per box.

    """
    if len(numops) != len(gold):
        raise EntitylensError(f"state {state}: {len(numops)} numops for {len(gold)} boxes; pass one per box")
    correct = score_statement(parsed, gold, mode=mode)
    return tuple(RowScore(state, b, int(n), c) for b, (n, c) in enumerate(zip(numops, correct, strict=True)))


@dataclass(frozen=True)
class Accuracy:
    """An accuracy with its 95% interval (:data:`entitylens.stats.INTERVAL_METHOD`).

    Attributes:
        correct: Correct rows.
        n: Rows.
        accuracy: ``correct / n`` (``nan`` when ``n == 0``).
        low: Lower end of the interval.
        high: Upper end of the interval.

    """

    correct: int
    n: int
    accuracy: float
    low: float
    high: float

    def __post_init__(self) -> None:
        if self.n < 0 or not 0 <= self.correct <= self.n:
            raise EntitylensError(f"accuracy needs 0 <= correct <= n, got {self.correct}/{self.n}; fix the counts")

    @classmethod
    def from_counts(cls, correct: int, n: int, z: float = Z_95) -> Accuracy:
        """Build from counts of independent rows: the accuracy and its Wilson interval."""
        correct, n = int(correct), int(n)
        if n < 0 or not 0 <= correct <= n:
            raise EntitylensError(f"accuracy needs 0 <= correct <= n, got {correct}/{n}; fix the counts")
        low, high = wilson_interval(correct, n, z)
        return cls(correct, n, correct / n if n else math.nan, low, high)

    @classmethod
    def from_rows(cls, correct: Sequence[bool], clusters: Sequence[Any], z: float = Z_95) -> Accuracy:
        """Build from rows clustered by state: the accuracy and its clustered Wilson interval."""
        k, n = sum(bool(c) for c in correct), len(correct)
        low, high = clustered_wilson(correct, clusters, z)
        return cls(k, n, k / n if n else math.nan, low, high)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``nan`` becomes ``None``)."""
        return {
            k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in (
                ("correct", self.correct),
                ("n", self.n),
                ("accuracy", self.accuracy),
                ("low", self.low),
                ("high", self.high),
            )
        }


@dataclass(frozen=True)
class ScoreReport:
    """Aggregated accuracy of a run.

    Attributes:
        overall: Accuracy over all box rows.
        by_numops: Accuracy per numops bucket, keys ``0 .. max_numops`` (all present, ``n`` may be 0); the
            key ``max_numops`` pools rows with ``numops >= max_numops``. Without a cap: the observed values.
        state: Fraction of states with every row correct.
        max_numops: The pooling cap (``None``: no pooling).

    """

    overall: Accuracy
    by_numops: Mapping[int, Accuracy]
    state: Accuracy
    max_numops: int | None = 7

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_numops", MappingProxyType(dict(sorted(self.by_numops.items()))))

    def numops_label(self, k: int) -> str:
        """Display label of bucket ``k``: ``"3"``, or ``"7+"`` for the pooled last bucket."""
        return f"{k}+" if self.max_numops is not None and k == self.max_numops else str(k)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``by_numops`` keyed by :meth:`numops_label`."""
        return {
            "overall": self.overall.to_dict(),
            "state": self.state.to_dict(),
            "by_numops": {self.numops_label(k): a.to_dict() for k, a in self.by_numops.items()},
            "max_numops": self.max_numops,
        }


def aggregate(records: Iterable[RowScore], *, max_numops: int | None = 7, z: float = Z_95) -> ScoreReport:
    """Aggregate per-row records into overall, per-numops and state accuracy.

    Args:
        records: Scored rows (any order); each (state, box) at most once.
        max_numops: Pool rows with ``numops >= max_numops`` into the last bucket (the paper's 0..7);
            ``None`` keeps every observed value separate.
        z: Normal quantile of the interval (1.96 = 95%).

    Returns:
        The report.

    """
    if max_numops is not None and (isinstance(max_numops, bool) or not isinstance(max_numops, int) or max_numops < 0):
        raise EntitylensError(f"max_numops must be an integer >= 0 or None, got {max_numops!r}")
    seen: set[tuple[str, int]] = set()
    buckets: dict[int, tuple[list[bool], list[str]]] = (
        {k: ([], []) for k in range(max_numops + 1)} if max_numops is not None else {}
    )
    states: dict[str, bool] = {}
    rows: list[bool] = []
    row_states: list[str] = []
    for r in records:
        key = (r.state, r.box)
        if key in seen:
            raise EntitylensError(f"row state={r.state!r} box={r.box} appears twice; score each box of a state once")
        seen.add(key)
        k = r.numops if max_numops is None else min(r.numops, max_numops)
        ys, cs = buckets.setdefault(k, ([], []))
        ys.append(bool(r.correct))
        cs.append(r.state)
        rows.append(bool(r.correct))
        row_states.append(r.state)
        states[r.state] = states.get(r.state, True) and r.correct
    return ScoreReport(
        overall=Accuracy.from_rows(rows, row_states, z),
        by_numops={k: Accuracy.from_rows(ys, cs, z) for k, (ys, cs) in buckets.items()},
        state=Accuracy.from_counts(sum(states.values()), len(states), z),
        max_numops=max_numops,
    )
