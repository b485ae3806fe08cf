"""Every known difference between our parser/scorer and KST24's, one test per row of docs/protocol.md §6.

KST24's rules are re-implemented here from their description (``src/evaluate/expand_results.py``,
``src/evaluate/compute_metrics.py``, order-insensitive mode), as a reference independent of ours.
"""

from __future__ import annotations

import re

import pytest

from entitylens.task.parse import parse_statement
from entitylens.task.score import score_statement

GOLD = (("car",), ("cross",), ("bag", "machine"), (), ("bill",), ("apple",), ("bottle", "map"))


def kst24_box_correct(pred: str, gold: str) -> bool:
    """KST24's per-box verdict, few-shot form: ``pred``/``gold`` are the text after ``contains``."""
    pred, gold = pred.strip(), gold.strip()
    if pred == gold:
        return True
    if gold in ("nothing", "is empty"):
        return False  # empty gold boxes need the exact string
    if "is empty" in pred or "nothing" in pred:
        items: set[str] = set()
    else:
        items = {i.replace("the ", "").replace("the", "") for i in re.split(r",? and |, ", pred)}
    return items == {i.replace("the ", "") for i in gold.split(" and ")}


def ours(box_text: str, gold: tuple[str, ...], box: int = 2) -> bool:
    """Our verdict for box ``box`` written as ``box_text`` inside an otherwise perfect statement."""
    parts = []
    for b, contents in enumerate(GOLD):
        if b == box:
            parts.append(f"Box {b} {box_text}")
        else:
            parts.append(f"Box {b} contains " + (" and ".join(f"the {o}" for o in contents) or "nothing"))
    golds = list(GOLD)
    golds[box] = gold
    return score_statement(parse_statement("Statement: " + ", ".join(parts) + "."), golds)[box]


@pytest.mark.parametrize(
    ("row", "written", "gold", "kst24", "entitylens"),
    [
        ("Oxford comma", "the crown, the sheet, and the tissue", ("crown", "sheet", "tissue"), True, True),
        ("repeated article", "the the magazine", ("magazine",), True, True),
        ("article glued to the noun", "thechemical", ("chemical",), True, False),
        ("object containing 'the', reordered", "the theremin and the car", ("car", "theremin"), False, True),
        ("object containing 'the', gold order", "the car and the theremin", ("car", "theremin"), True, True),
        ("reordered list", "the machine and the bag", ("bag", "machine"), True, True),
    ],
)
def test_object_list_rows(row: str, written: str, gold: tuple[str, ...], kst24: bool, entitylens: bool) -> None:
    gold_text = " and ".join(f"the {o}" for o in gold)
    assert kst24_box_correct(written, gold_text) is kst24, row
    assert ours(f"contains {written}", gold) is entitylens, row


def test_empty_box_written_as_is_empty() -> None:
    # Few-shot gold "nothing": KST24 needs the exact string; our set mode takes "is empty" as the empty set.
    assert kst24_box_correct("is empty", "nothing") is False
    assert ours("is empty", (), box=3) is True


def test_period_before_the_next_box() -> None:
    # KST24 cuts the prediction at its first "." so every box after ". Box" is lost (invalid); we read on.
    text = "Statement: Box 0 contains the car. Box 1 contains the cross, Box 2 contains the bag and the machine"
    kst24_kept = text.split("Statement:")[1][: text.split("Statement:")[1].index(".")]
    assert "Box 1" not in kst24_kept
    parsed = parse_statement(text + ", Box 3 contains nothing, Box 4 contains the bill, Box 5 contains the apple, "
                             "Box 6 contains the bottle and the map.")  # fmt: skip
    assert parsed.boxes == GOLD


def test_repeated_box_first_mention_wins() -> None:
    # KST24 sorts the box parts and keeps the first 7, so a repeated box can push Box 6 out; we keep the
    # first mention of each box and ignore the repeat.
    parts = [f"Box {b} contains " + (" and ".join(f"the {o}" for o in c) or "nothing") for b, c in enumerate(GOLD)]
    text = "Statement: " + ", ".join([*parts[:3], "Box 2 contains the cup", *parts[3:]]) + "."
    body = text.split("Statement:")[1].rstrip(".").replace("Box 0 contains", "")
    split = re.split(r", and Box|, Box| and Box|; Box", body)
    kst24_parts = (split[:1] + sorted(split[1:]))[:7]  # the first part is Box 0's, the others sorted
    assert not any(p.strip().startswith("6") for p in kst24_parts)  # Box 6 pushed out
    parsed = parse_statement(text)
    assert parsed.boxes == GOLD and parsed.duplicates == (2,)


def test_bare_contains_is_invalid_in_both() -> None:
    assert ours("contains", ("bag", "machine")) is False
    assert parse_statement("Statement: Box 0 contains, Box 1 contains the cross.").boxes[0] is None
