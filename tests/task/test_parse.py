"""Statement parser: hand-worked cases for every rule, plus round-trip and KST24-regex properties."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from entitylens.errors import EntitylensError
from entitylens.task.parse import INVALID, ParsedStatement, parse_objects, parse_statement
from entitylens.task.prompts import KST24, statement_text

GOLD_TEXT = (
    "Box 0 contains the plane, Box 1 contains the cross, Box 2 contains the bag and the machine and the map, "
    "Box 3 contains the coat, Box 4 contains nothing, Box 5 contains the apple and the cash and the glass, "
    "Box 6 contains the bottle."
)
GOLD = (
    ("plane",),
    ("cross",),
    ("bag", "machine", "map"),
    ("coat",),
    (),
    ("apple", "cash", "glass"),
    ("bottle",),
)
GOLD_RAW = (
    "the plane",
    "the cross",
    "the bag and the machine and the map",
    "the coat",
    "nothing",
    "the apple and the cash and the glass",
    "the bottle",
)


def test_invalid_is_a_distinct_sentinel():
    assert INVALID is None
    assert INVALID != ()


@pytest.mark.parametrize(
    "text",
    [
        GOLD_TEXT,
        " " + GOLD_TEXT,
        "Statement: " + GOLD_TEXT,
        "\nStatement: " + GOLD_TEXT + "\n\nDescription: Box 0 contains the dog, Box 4 contains the cat.",
        "...Put the coat into Box 3.\nStatement: " + GOLD_TEXT + " Then more text.",
        "Statement: Statement: " + GOLD_TEXT,
        GOLD_TEXT + "\nDescription: Box 4 contains the cat.",
    ],
)
def test_canonical_statement(text):
    p = parse_statement(text)
    assert p.boxes == GOLD
    assert p.raw == GOLD_RAW
    assert p.terminated and p.is_valid
    assert p.duplicates == () and p.out_of_range == ()


def test_prompt_plus_target_parses_to_gold():
    # The full text a perfect model yields: the prompt (which itself contains demo statements) + target.
    ctx = "Box 0 contains the car, Box 1 contains nothing. Put the pen into Box 1."
    contents = [("car",), ("pen",), (), (), (), (), ()]
    p = parse_statement(KST24.target_text(contents))
    assert p.boxes == tuple(contents)
    # Parsing starts after the FIRST "Statement:", which in a full transcript is the one quoted in the
    # instruction: callers must pass the generated text only.
    assert parse_statement(KST24.prompt(ctx) + KST24.target_text(contents)).boxes == (INVALID,) * 7


def test_reversed_object_order_sorted_but_raw_kept():
    p = parse_statement("Box 0 contains the map and the bag, Box 1 contains the z and the y and the x.", 2)
    assert p.boxes == (("bag", "map"), ("x", "y", "z"))
    assert p.raw == ("the map and the bag", "the z and the y and the x")


def test_empty_forms():
    p = parse_statement("Box 0 contains nothing, Box 1 is empty, Box 2 contains, Box 3 contains the a.", 4)
    # A bare "Box 2 contains" makes no claim about the box: invalid, as in KST24's scorer.
    assert p.boxes == ((), (), INVALID, ("a",))
    assert p.raw == ("nothing", "is empty", "", "the a")


def test_separator_variants():
    text = (
        "Box 0 contains the a. Box 1 contains the b; Box 2 contains the c, and Box 3 contains the d and "
        "Box 4 contains the e,\nBox 5 contains the f.\nBox 6 contains nothing."
    )
    p = parse_statement(text)
    assert p.boxes == (("a",), ("b",), ("c",), ("d",), ("e",), ("f",), ())
    assert p.terminated


def test_commas_and_articles_inside_a_box():
    assert parse_objects("the car, the map and the pen") == ("car", "map", "pen")
    assert parse_objects("car and map") == ("car", "map")
    assert parse_objects("The Car") == ("Car",)
    assert parse_objects("the green shoe and the big rose") == ("big rose", "green shoe")
    assert parse_objects("the car and the car") == ("car", "car")
    assert parse_objects("nothing") == () and parse_objects("") == () and parse_objects("is empty") == ()
    assert parse_objects("the car.") == ("car",)


def test_boxes_out_of_order_and_missing():
    p = parse_statement("Box 6 contains the g, Box 0 contains the a, Box 3 contains nothing.")
    assert p.boxes == (("a",), INVALID, INVALID, (), INVALID, INVALID, ("g",))
    assert p.raw == ("the a", None, None, "nothing", None, None, "the g")
    assert p.invalid_boxes == (1, 2, 4, 5) and not p.is_valid


def test_duplicate_box_first_mention_wins():
    p = parse_statement("Box 0 contains the a, Box 1 contains the b, Box 0 contains the z, Box 1 is empty.", 2)
    assert p.boxes == (("a",), ("b",))
    assert p.raw == ("the a", "the b")
    assert p.duplicates == (0, 1)


def test_extra_boxes_ignored():
    p = parse_statement("Box 0 contains the a, Box 7 contains the h, Box 12 contains nothing, Box 1 contains the b.", 2)
    assert p.boxes == (("a",), ("b",))
    assert p.out_of_range == (7, 12)


def test_unknown_verb_is_invalid_with_raw():
    p = parse_statement("Box 0 has the a, Box 1 contains the b.", 2)
    assert p.boxes == (INVALID, ("b",))
    assert p.raw == ("has the a", "the b")


def test_truncated_mid_box():
    cut = GOLD_TEXT[: GOLD_TEXT.index("machine") + 3]  # "... Box 2 contains the bag and the mac"
    p = parse_statement(cut)
    assert not p.terminated
    assert p.boxes == (("plane",), ("cross",), INVALID, INVALID, INVALID, INVALID, INVALID)
    assert p.raw[2] == "the bag and the mac"
    # Without require_end the partial box is parsed as written (and will score as wrong).
    q = parse_statement(cut, require_end=False)
    assert q.boxes[2] == ("bag", "mac")
    assert q.boxes[3:] == (INVALID,) * 4


def test_truncated_after_last_box_without_period():
    p = parse_statement(GOLD_TEXT[:-1])  # a generation cut right before the closing period
    assert not p.terminated
    assert p.boxes == GOLD[:6] + (INVALID,)
    assert parse_statement(GOLD_TEXT[:-1], require_end=False).boxes == GOLD
    # A line break ends the statement properly.
    assert parse_statement(GOLD_TEXT[:-1] + "\nThe end").boxes == GOLD


def test_truncated_in_a_duplicate_keeps_first_mention():
    p = parse_statement("Box 0 contains the a, Box 1 contains the b, Box 0 contains the z", 2)
    assert p.boxes == (("a",), ("b",)) and p.duplicates == (0,) and not p.terminated


def test_empty_and_garbage_text():
    p = parse_statement("")
    assert p.boxes == (INVALID,) * 7 and p.raw == (None,) * 7 and not p.terminated
    assert parse_statement("I don't know.").boxes == (INVALID,) * 7


@pytest.mark.usefixtures("no_shape_checks")
def test_bad_arguments():
    with pytest.raises(EntitylensError):
        parse_statement(b"Box 0 contains the a.")  # type: ignore[arg-type]
    with pytest.raises(EntitylensError):
        parse_statement("Box 0 contains the a.", 0)
    with pytest.raises(EntitylensError):
        ParsedStatement(boxes=((),), raw=(), terminated=True)


# --- properties ---------------------------------------------------------------------------------

WORD = st.from_regex(r"[a-z]{1,8}", fullmatch=True).filter(lambda w: w not in {"the", "and", "nothing"})


@st.composite
def contents_st(draw, num_boxes=7):
    objs = draw(st.lists(WORD, unique=True, max_size=3 * num_boxes))
    cuts = sorted(draw(st.lists(st.integers(0, len(objs)), min_size=num_boxes - 1, max_size=num_boxes - 1)))
    bounds = [0, *cuts, len(objs)]
    return [tuple(sorted(objs[a:b])) for a, b in zip(bounds, bounds[1:], strict=False)]


@settings(max_examples=150, deadline=None)
@given(contents_st(), st.randoms(use_true_random=False))
def test_round_trip_gold_text(contents, rnd):
    text = KST24.target_text(contents)
    p = parse_statement(text)
    assert p.boxes == tuple(contents) and p.terminated
    # Shuffling the boxes' order and the objects inside each box changes nothing but raw.
    parts = []
    for i, c in enumerate(contents):
        objs = list(c)
        rnd.shuffle(objs)
        parts.append(f"Box {i} contains " + (" and ".join(f"the {o}" for o in objs) or "nothing"))
    rnd.shuffle(parts)
    assert parse_statement(", ".join(parts) + ".").boxes == tuple(contents)


KST24_REGEX = (
    r"Statement: Box 0 contains( [a-zA-Z]+)*, Box 1 contains( [a-zA-Z]+)*, Box 2 contains( [a-zA-Z]+)*,"
    r" Box 3 contains( [a-zA-Z]+)*, Box 4 contains( [a-zA-Z]+)*, Box 5 contains( [a-zA-Z]+)*,"
    r" Box 6 contains( [a-zA-Z]+)*\."
)


GRAMMAR_WORD = st.from_regex(r"[a-zA-Z]{1,7}", fullmatch=True) | st.sampled_from(
    ["and", "the", "nothing", "Box", "is", "empty", "contains", "Statement", "Description"]
)


@st.composite
def kst24_grammar_output(draw):
    """A string in the language of KST24's regex: each box's free part is zero or more [a-zA-Z]+ words."""
    words = [draw(st.lists(GRAMMAR_WORD, max_size=6)) for _ in range(7)]
    return (
        "Statement: "
        + ", ".join(f"Box {i} contains" + "".join(" " + w for w in ws) for i, ws in enumerate(words))
        + "."
    )


@settings(max_examples=200, deadline=None)
@given(kst24_grammar_output())
@example(
    "Statement: Box 0 contains and, Box 1 contains the car and, Box 2 contains, Box 3 contains Box,"
    " Box 4 contains is empty, Box 5 contains nothing, Box 6 contains the x and."
)
def test_every_kst24_grammar_output_parses_to_seven_boxes(text):
    # Anything KST24's constrained decoder can emit yields a prediction for every box, with the raw
    # string being exactly the words the model chose for that box.
    assert re.fullmatch(KST24_REGEX, text)
    p = parse_statement(text)
    assert p.terminated and p.duplicates == ()
    words = re.fullmatch(
        r"Statement: " + ", ".join(rf"Box {i} contains((?: [a-zA-Z]+)*)" for i in range(7)) + r"\.", text
    )
    assert words is not None
    assert p.raw == tuple(" ".join(words.group(i + 1).split()) for i in range(7))
    # Every box with at least one word gets a prediction; a box with none is invalid (no claim).
    assert all((p.boxes[i] is INVALID) == (p.raw[i] == "") for i in range(7))


def test_statement_text_is_parse_inverse_on_hand_case():
    assert parse_statement(statement_text(GOLD)).boxes == GOLD
