"""Surface forms: hand-written K&S sentences for every variant/form, and parsing them back."""

from __future__ import annotations

import pytest

from entitylens.errors import EntitylensError
from entitylens.task.text import (
    describe_boxes,
    describe_operation,
    masked_content,
    parse_context,
    parse_masked_content,
    parse_masked_content_ordered,
    parse_masked_query,
    render_context,
    render_row,
)
from entitylens.task.types import Operation
from entitylens.task.vocab import BNC_OBJECTS
from entitylens.task.world import sample_scenario

INITIAL = (("car",), (), ("bag", "machine"), ("paper", "string"), ("bill",), ("apple", "cash", "glass"), ())
OPS = (
    Operation("remove", ("car",), 0),
    Operation("move", ("paper", "string"), 3, 6),
    Operation("put", ("plane",), 1),
    Operation("move_contents", ("bill",), 4, 0),
    Operation("move", ("cash",), 5, 4),
)

BASE_FEWSHOT = (
    "Box 0 contains the car, Box 1 contains nothing, Box 2 contains the bag and the machine, "
    "Box 3 contains the paper and the string, Box 4 contains the bill, Box 5 contains the apple and the cash "
    "and the glass, Box 6 contains nothing. Remove the car from Box 0. Move the paper and the string from Box 3 "
    "to Box 6. Put the plane into Box 1. Move the contents of Box 4 to Box 0. Move the cash from Box 5 to Box 4."
)
ALT = (
    "The car is in Container A, there is nothing in Container B, the bag and the machine are in Container C, "
    "the paper and the string are in Container D, the bill is in Container E, the apple and the cash and the "
    "glass are in Container F, there is nothing in Container G. Take the car out of Container A. Pick up the "
    "paper and the string in Container D and place them into Container G. Place the plane inside Container B. "
    "Pick up the contents of Container E and place them into Container A. Pick up the cash in Container F and "
    "place it into Container E."
)
FINAL = (("bill",), ("plane",), ("bag", "machine"), (), ("cash",), ("apple", "glass"), ("paper", "string"))


def test_base_fewshot_and_t5_text_by_hand():
    assert render_context(INITIAL, OPS, "move-contents", "fewshot") == BASE_FEWSHOT
    t5 = BASE_FEWSHOT.replace("Box 1 contains nothing", "Box 1 is empty").replace(
        "Box 6 contains nothing", "Box 6 is empty"
    )
    assert render_context(INITIAL, OPS, "move-contents", "t5") == t5


def test_altforms_text_by_hand():
    assert render_context(INITIAL, OPS, "altforms", "fewshot") == ALT
    assert render_context(INITIAL, OPS, "altforms", "t5") == ALT  # AltForms description has no 'empty' form
    assert describe_boxes(((), ("x",)), "altforms") == "There is nothing in Container A, the x is in Container B."


def test_operation_sentences_by_hand():
    assert describe_operation(Operation("move", ("b", "a"), 1, 3)) == "Move the a and the b from Box 1 to Box 3."
    assert describe_operation(Operation("remove", ("x",), 1)) == "Remove the x from Box 1."
    assert describe_operation(Operation("put", ("x", "y"), 2)) == "Put the x and the y into Box 2."
    assert describe_operation(Operation("move_contents", ("x",), 2, 6)) == "Move the contents of Box 2 to Box 6."
    assert (
        describe_operation(Operation("move", ("x",), 0, 2), "altforms")
        == "Pick up the x in Container A and place it into Container C."
    )


def _ks_reference_row(context: str, query_sentence: str, fewshot: bool) -> dict:
    """K&S example_to_t5, re-derived: split the example at '.', mask the last sentence."""
    ex = context + " " + query_sentence
    sentences = ex.split(".")
    last = sentences[-2]
    head = ".".join(sentences[:-2]) + "."
    if "is empty" in last:
        return {
            "sentence": ex,
            "sentence_masked": head + last.replace("is empty", "<extra_id_0> ."),
            "masked_content": "<extra_id_0> is empty",
        }
    start = last.index("contains") + (len("contains ") if fewshot else 0)
    return {
        "sentence": ex,
        "sentence_masked": head + last[:start] + "<extra_id_0> .",
        "masked_content": "<extra_id_0> " + last[start:],
    }


@pytest.mark.parametrize("form", ["fewshot", "t5"])
@pytest.mark.parametrize("variant", ["base", "altforms"])
def test_rows_match_ks_masking(form, variant):
    ctx = render_context(INITIAL, OPS[:3], variant, form)
    # after the first three operations (hand-computed)
    after3 = ((), ("plane",), ("bag", "machine"), (), ("bill",), ("apple", "cash", "glass"), ("paper", "string"))
    noun = "Container" if variant == "altforms" else "Box"
    for box, contents in enumerate(after3):
        label = chr(65 + box) if variant == "altforms" else str(box)
        if contents:
            q = f"{noun} {label} contains " + " and ".join(f"the {o}" for o in contents) + "."
        else:
            q = f"{noun} {label} contains nothing." if form == "fewshot" else f"{noun} {label} is empty."
        assert render_row(ctx, box, contents, variant, form) == _ks_reference_row(ctx, q, form == "fewshot")


def test_masked_forms_by_hand():
    row = render_row("C.", 3, ("bottle",), "base", "fewshot")
    assert row == {
        "sentence": "C. Box 3 contains the bottle.",
        "sentence_masked": "C. Box 3 contains <extra_id_0> .",
        "masked_content": "<extra_id_0> the bottle",
    }
    assert render_row("C.", 3, (), "base", "t5")["masked_content"] == "<extra_id_0> is empty"
    assert render_row("C.", 3, (), "base", "t5")["sentence_masked"] == "C. Box 3 <extra_id_0> ."
    assert masked_content(("a", "b"), "t5") == "<extra_id_0> contains the a and the b"
    assert masked_content((), "fewshot") == "<extra_id_0> nothing"


@pytest.mark.parametrize("variant", ["base", "altforms", "move-contents"])
@pytest.mark.parametrize("form", ["fewshot", "t5"])
def test_parse_hand_written_context(variant, form):
    text = render_context(INITIAL, OPS, variant if variant != "base" else "move-contents", form)
    parsed = parse_context(text)
    assert parsed.initial == INITIAL
    assert parsed.operations == OPS
    assert parsed.boxes == FINAL
    assert parsed.variant == ("altforms" if variant == "altforms" else "move-contents")
    assert parsed.form == (None if variant == "altforms" else form)


def test_parse_detects_base_variant_and_missing_form():
    sc = sample_scenario(0, 0, BNC_OBJECTS, num_operations=3)
    full = tuple((f"x{i}", f"y{i}") for i in range(7))
    assert parse_context(render_context(full, (), "base", "t5")).form is None  # no empty box: undetermined
    assert parse_context(render_context(sc.initial, sc.operations, "base", "fewshot")).variant == "base"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("Box 0 contains the car, Box 1 holds the cup.", "cannot parse description clause"),
        ("Box 0 contains the car, Box 2 contains nothing.", "list boxes in order"),
        ("Box 0 contains the car, Box 1 contains nothing. Move the car from Box 0 to Box 7.", "box 7"),
        ("Box 0 contains the car, Box 1 contains nothing. Remove the cup from Box 0.", "'cup'"),
        ("Box 0 contains the car, Box 1 contains nothing. Jump the car.", "cannot parse operation"),
        ("Box 0 contains nothing, Box 1 is empty.", "mixes"),
        ("Box 0 contains the car. Take the car out of Container A.", "style"),
        ("Box 0 contains car.", "cannot parse"),
    ],
)
def test_parse_errors_are_one_line(text, fragment):
    with pytest.raises(EntitylensError, match=fragment) as e:
        parse_context(text)
    assert "\n" not in str(e.value)


def test_masked_query_and_content_parsing():
    assert parse_masked_query("A. B. Box 3 contains <extra_id_0> .") == ("A. B.", "Box", "3", "fewshot")
    assert parse_masked_query("A. Container D <extra_id_0> .") == ("A.", "Container", "D", "t5")
    with pytest.raises(EntitylensError, match="sentence_masked"):
        parse_masked_query("A. Box 3 contains the cup.")
    assert parse_masked_content("<extra_id_0> the a and the b", "fewshot") == ("a", "b")
    assert parse_masked_content("<extra_id_0> nothing", "fewshot") == ()
    assert parse_masked_content("<extra_id_0> is empty", "t5") == ()
    assert parse_masked_content("<extra_id_0> contains the a", "t5") == ("a",)
    # Lists out of alphabetical order (K&S disjoint-vocabulary and modifier files) are sets all the same.
    assert parse_masked_content("<extra_id_0> the b and the a", "fewshot") == ("a", "b")
    assert parse_masked_content_ordered("<extra_id_0> the green b and the red a", "fewshot") == ("green b", "red a")
    with pytest.raises(EntitylensError, match="twice"):
        parse_masked_content("<extra_id_0> the a and the a", "fewshot")
    with pytest.raises(EntitylensError, match="T5 form"):
        parse_masked_content("<extra_id_0> the a", "t5")
