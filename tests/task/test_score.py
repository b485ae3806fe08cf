"""Scorer: set vs strict box correctness, clustered Wilson intervals by hand, aggregation against the paper's table."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import pytest

from entitylens.errors import EntitylensError
from entitylens.task.parse import INVALID, parse_statement
from entitylens.task.score import (
    Accuracy,
    RowScore,
    aggregate,
    box_correct,
    score_state,
    score_statement,
)

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"


@pytest.mark.parametrize(
    ("predicted", "raw", "gold", "set_ok", "strict_ok"),
    [
        (("bag", "map"), "the bag and the map", ("bag", "map"), True, True),
        (("bag", "map"), "the map and the bag", ("bag", "map"), True, False),  # reversed order
        ((), "nothing", (), True, True),
        ((), "is empty", (), True, False),
        (INVALID, "", (), False, False),  # "Box 4 contains," with no words: parsed as invalid
        (("bag",), "the bag", ("bag", "map"), False, False),
        (("bag", "cup", "map"), "the bag and the cup and the map", ("bag", "map"), False, False),
        (("bag", "map"), "the bag, the map", ("bag", "map"), True, False),  # comma-separated
        (("bag", "map"), "bag and map", ("bag", "map"), True, False),  # no articles
        (("car", "car"), "the car and the car", ("car",), True, False),  # duplicate: equal as sets
        (INVALID, None, (), False, False),
        (INVALID, "the bag and the mac", ("bag", "machine"), False, False),  # truncated box
    ],
)
def test_box_correct_set_vs_strict(predicted, raw, gold, set_ok, strict_ok):
    assert box_correct(predicted, gold, raw=raw) is set_ok
    assert box_correct(predicted, gold, raw=raw, mode="set") is set_ok
    assert box_correct(predicted, gold, raw=raw, mode="strict") is strict_ok


@pytest.mark.usefixtures("no_shape_checks")
def test_bad_mode():
    with pytest.raises(EntitylensError, match="score mode"):
        box_correct((), (), mode="exact")  # type: ignore[arg-type]


GOLD = [
    ("plane",),
    ("cross",),
    ("bag", "machine", "map"),
    ("coat",),
    (),
    ("apple", "cash", "glass"),
    ("bottle",),
]


def test_score_statement_hand_case():
    text = (
        "Statement: Box 0 contains the plane, Box 1 is empty, "
        "Box 2 contains the map and the bag and the machine, "
        "Box 3 contains the coat, Box 4 contains nothing, Box 6 contains the bottle, Box 5 contains the apple"
    )
    p = parse_statement(text)
    # box 1 wrong; box 2 right as a set only; box 5 truncated (INVALID).
    assert score_statement(p, GOLD) == (True, False, True, True, True, False, True)
    assert score_statement(p, GOLD, mode="strict") == (True, False, False, True, True, False, True)
    with pytest.raises(EntitylensError, match="num_boxes"):
        score_statement(p, GOLD[:6])


def test_score_state_records():
    p = parse_statement("Box 0 contains the a, Box 1 contains the c.", 2)
    rows = score_state(p, [("a",), ("b",)], [0, 3], "7:2")
    assert rows == (RowScore("7:2", 0, 0, True), RowScore("7:2", 1, 3, False))
    with pytest.raises(EntitylensError):
        score_state(p, [("a",), ("b",)], [0], "7:2")


def _wilson(k: float, n: float, z: float = 1.959963984540054) -> tuple[float, float]:
    # written out from the formula: (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def test_intervals_are_wilson_and_never_collapse():
    a = Accuracy.from_counts(0, 5)
    assert a.low == 0.0 and a.high == pytest.approx(_wilson(0, 5)[1]) and a.high > 0.4  # Wald gave [0, 0]
    b = Accuracy.from_counts(3, 4)
    assert (b.low, b.high) == (pytest.approx(_wilson(3, 4)[0]), pytest.approx(_wilson(3, 4)[1])) and b.high < 1


def test_accuracy_from_counts():
    a = Accuracy.from_counts(3, 4)
    assert (a.correct, a.n, a.accuracy) == (3, 4, 0.75)
    assert math.isnan(Accuracy.from_counts(0, 0).accuracy)
    assert Accuracy.from_counts(0, 0).to_dict() == {
        "correct": 0,
        "n": 0,
        "accuracy": None,
        "low": None,
        "high": None,
    }
    for c, n in ((5, 4), (-1, 3), (0, -1)):
        with pytest.raises(EntitylensError):
            Accuracy.from_counts(c, n)


def test_aggregate_hand_case():
    rows = [
        # state "a": all right
        RowScore("a", 0, 0, True),
        RowScore("a", 1, 1, True),
        RowScore("a", 2, 9, True),
        # state "b": one wrong
        RowScore("b", 0, 0, True),
        RowScore("b", 1, 1, False),
        RowScore("b", 2, 7, False),
        # state "c": all wrong
        RowScore("c", 0, 2, False),
    ]
    r = aggregate(rows)
    assert (r.overall.correct, r.overall.n) == (4, 7)
    assert r.overall.accuracy == pytest.approx(4 / 7)
    # rows clustered by state: a = 3/3, b = 1/3, c = 0/1; Kish design effect by hand, then Wilson on n / deff
    p, n = 4 / 7, 7
    robust = 3 / 2 * ((3 - 3 * p) ** 2 + (1 - 3 * p) ** 2 + (0 - 1 * p) ** 2) / n**2
    deff = max(1.0, robust / (p * (1 - p) / n))
    assert deff > 1
    lo, hi = _wilson(p * n / deff, n / deff)
    assert (r.overall.low, r.overall.high) == (pytest.approx(lo), pytest.approx(hi))
    assert (r.state.correct, r.state.n) == (1, 3)
    assert list(r.by_numops) == list(range(8))
    counts = {k: (a.correct, a.n) for k, a in r.by_numops.items()}
    assert counts == {0: (2, 2), 1: (1, 2), 2: (0, 1), 3: (0, 0), 4: (0, 0), 5: (0, 0), 6: (0, 0), 7: (1, 2)}
    assert math.isnan(r.by_numops[3].accuracy)
    assert r.numops_label(7) == "7+" and r.numops_label(6) == "6"
    d = r.to_dict()
    assert list(d["by_numops"]) == ["0", "1", "2", "3", "4", "5", "6", "7+"]
    assert d["by_numops"]["3"]["accuracy"] is None
    json.dumps(d, allow_nan=False)  # valid JSON: no NaN
    # No pooling: observed values only.
    r2 = aggregate(rows, max_numops=None)
    assert {k: (a.correct, a.n) for k, a in r2.by_numops.items()} == {
        0: (2, 2),
        1: (1, 2),
        2: (0, 1),
        7: (0, 1),
        9: (1, 1),
    }
    assert r2.to_dict()["by_numops"].keys() == {"0", "1", "2", "7", "9"}
    # Order of records does not matter.
    assert aggregate(reversed(rows)).to_dict() == d


def test_aggregate_empty_and_bad_input():
    r = aggregate([])
    assert r.overall.n == 0 and math.isnan(r.overall.accuracy) and r.state.n == 0
    with pytest.raises(EntitylensError, match="twice"):
        aggregate([RowScore("a", 0, 0, True), RowScore("a", 0, 1, False)])
    with pytest.raises(EntitylensError):
        aggregate([], max_numops=-1)
    with pytest.raises(EntitylensError):
        RowScore("a", 0, -1, True)


def test_aggregate_reproduces_paper_overall_column():
    """Rebuild row records from KST24's per-numops table and recover the paper's Overall column."""
    path = SHARED / "anchors/code-models-entity-tracking/analysis/model_results.csv"
    if not path.is_file():
        pytest.skip("KST24 model_results.csv not available")
    table: dict[str, dict[int, tuple[float, int]]] = defaultdict(dict)
    with path.open(encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["model_name"].startswith("Random"):
                continue
            value = (float(row["accuracy"]), int(row["count"]))
            # The CSV lists Gemma-7B twice with identical rows; any other repeat must agree too.
            assert table[row["model_name"]].setdefault(int(row["num_ops"]), value) == value
    headline = {  # DESIGN §2, overall % (one decimal)
        "LLAMA2-7B (meta-llama/Llama-2-7b-hf)": 21.3,
        "Code Llama 7B (codellama/CodeLlama-7b-hf)": 31.9,
        "Llama 13B (meta-llama/Llama-2-13b-hf)": 33.3,
        "CodeLlama 13B (codellama/CodeLlama-13b-hf)": 54.8,
        "Llama-2 70B (meta-llama/Llama-2-70b-hf)": 62.1,
        "CodeLlama 70B (codellama/CodeLlama-70b-hf)": 69.8,
        "Deepseek 7B (deepseek-ai/deepseek-llm-7b-base)": 23.5,
        "Deepseek 7B Coder Base (deepseek-ai/deepseek-coder-7b-base-v1.5)": 53.7,
        "Gemma-7B (google/gemma-7b)": 42.7,
        "CodeGemma-7B (google/codegemma-7b)": 46.1,
    }
    assert set(headline) <= set(table)
    for model, by_numops in table.items():
        buckets = [(k, acc, count) for k, (acc, count) in sorted(by_numops.items())]
        rows = []
        for numops, acc, count in buckets:
            n_correct = round(acc * count / 100)
            assert abs(100 * n_correct / count - acc) < 0.006, (model, numops)  # percents are exact counts
            rows += [RowScore(f"{numops}:{i}", 0, numops, i < n_correct) for i in range(count)]
        r = aggregate(rows)
        assert r.overall.n == 5012
        for numops, acc, _ in buckets:
            assert 100 * r.by_numops[numops].accuracy == pytest.approx(acc, abs=0.006)
        if model in headline:
            assert round(100 * r.overall.accuracy, 1) == headline[model], model
