"""The statement DFA against Python's own regex engines (``re.fullmatch``; ``regex`` partial matching)."""

from __future__ import annotations

import re

import pytest
import regex as regex_mod
from hypothesis import given, settings
from hypothesis import strategies as st

from entitylens.behavior.grammar import DEAD, StatementGrammar
from entitylens.errors import EntitylensError

G7 = StatementGrammar()
G2 = StatementGrammar(num_boxes=2, prefix="Statement:")

# DESIGN §2's regex, written out by hand (7 boxes, starting at "Statement:").
DESIGN_REGEX = (
    "Statement: Box 0 contains( [a-zA-Z]+)*, Box 1 contains( [a-zA-Z]+)*, Box 2 contains( [a-zA-Z]+)*, "
    "Box 3 contains( [a-zA-Z]+)*, Box 4 contains( [a-zA-Z]+)*, Box 5 contains( [a-zA-Z]+)*, "
    "Box 6 contains( [a-zA-Z]+)*\\."
)

VALID = [
    "\nStatement: Box 0 contains the car and the map, Box 1 contains, Box 2 contains nothing, Box 3 contains "
    "the coat, Box 4 contains nothing, Box 5 contains the apple and the cash and the glass, Box 6 contains the "
    "bottle.",
    "\nStatement: Box 0 contains, Box 1 contains, Box 2 contains, Box 3 contains, Box 4 contains, Box 5 "
    "contains, Box 6 contains.",
    "\nStatement: Box 0 contains X, Box 1 contains a b c, Box 2 contains Nothing, Box 3 contains the, Box 4 "
    "contains ZZZ, Box 5 contains q, Box 6 contains nothing.",
]
INVALID = [
    "Statement: Box 0 contains, Box 1 contains, Box 2 contains, Box 3 contains, Box 4 contains, Box 5 "
    "contains, Box 6 contains.",  # missing the leading newline of the prefix
    VALID[0][:-1],  # no final period
    VALID[0] + " ",  # trailing text
    VALID[0].replace("contains the car", "containsthe car"),  # word glued to "contains"
    VALID[0].replace("the car and", "the car  and"),  # double space
    VALID[0].replace("the coat", "the coat2"),  # digit in a word
    VALID[0].replace("the coat", "the caf\u00e9"),  # non-ASCII letter
    VALID[0].replace(", Box 1 contains", ""),  # a box missing
    VALID[0].replace("Box 3", "Box 4", 1),  # boxes out of order
    VALID[0].replace(", Box 2", ",Box 2"),  # separator without space
    VALID[0].replace("the car and", "the car, and"),  # comma inside a box
    VALID[0].replace("contains, Box 2", "contains , Box 2"),  # space before the separator
]


def test_regex_is_design_regex() -> None:
    g = StatementGrammar(prefix="Statement:")
    assert g.regex == DESIGN_REGEX
    assert G7.regex == "\\n" + DESIGN_REGEX


@pytest.mark.parametrize("text", VALID)
def test_hand_written_valid_statements(text: str) -> None:
    assert G7.matches(text)
    assert re.fullmatch(G7.regex, text)


@pytest.mark.parametrize("text", INVALID)
def test_hand_written_invalid_statements(text: str) -> None:
    assert not G7.matches(text)
    assert not re.fullmatch(G7.regex, text)


def test_forced_continuations_by_hand() -> None:
    g = G7
    assert g.forced(g.initial_state) == "\nStatement: Box 0 contains"
    after0 = g.walk(g.initial_state, "\nStatement: Box 0 contains")
    assert g.info(after0).kind == "after_contains" and g.forced(after0) == ""
    assert g.forced(g.walk(after0, " the map")) == ""  # in a word: letter, space or "," may follow
    assert g.forced(g.walk(after0, " ")) == ""  # a letter must follow, but which one is open
    sep = g.walk(after0, " the map,")
    assert g.forced(sep) == " Box 1 contains"
    assert g.forced(g.walk(sep, " Bo")) == "x 1 contains"
    assert g.info(g.walk(sep, " Bo")).segment_done == ", Bo"
    last = g.walk(g.initial_state, VALID[1][:-1])
    assert g.forced(last) == "" and g.accepts(g.step(last, "."))
    assert g.forced(g.accept_state) == ""


def test_state_count_and_word_states() -> None:
    # One literal state before each forced character (a separator segment starts at the previous box's
    # after_contains state), 3 word states per box, and the accepting state.
    literal = len("\nStatement: Box 0 contains") + 6 * (len(", Box 1 contains") - 1)
    assert G7.num_states == literal + 3 * 7 + 1
    for k in range(7):
        kinds = [G7.info(s).kind for s in G7.word_states(k)]
        assert kinds == ["after_contains", "after_space", "in_word"]
        assert all(G7.info(s).box == k for s in G7.word_states(k))


def test_prefix_with_regex_metacharacters_is_escaped() -> None:
    g = StatementGrammar(num_boxes=1, prefix="A.(b)*+?[x]{2}|$^\\ -#&~\t:")
    text = g.prefix + " Box 0 contains it."
    assert g.matches(text)
    assert re.fullmatch(g.regex, text)
    assert not re.fullmatch(g.regex, "A" + text[1:].replace(".", "z", 1))


@pytest.mark.usefixtures("no_shape_checks")
@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [({"num_boxes": 0}, "num_boxes"), ({"num_boxes": True}, "num_boxes"), ({"prefix": 3}, "prefix")],
)
def test_bad_configuration(kwargs: dict, fragment: str) -> None:
    with pytest.raises(EntitylensError, match=fragment):
        StatementGrammar(**kwargs)


def test_completion_requires_live_state() -> None:
    with pytest.raises(EntitylensError, match="dead"):
        G7.completion(DEAD)


# --------------------------------------------------------------------------------------- hypothesis
_ALPHABET = list(" ,.:\nBoxcntaisSemthe0123456789zZQé-")
_words = st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCXYZ", min_size=1, max_size=6), max_size=3)


@st.composite
def statements(draw: st.DrawFn, grammar: StatementGrammar) -> str:
    boxes = [draw(_words) for _ in range(grammar.num_boxes)]
    body = ", ".join(f"Box {k} contains" + "".join(" " + w for w in ws) for k, ws in enumerate(boxes))
    return f"{grammar.prefix} {body}."


@st.composite
def mutated(draw: st.DrawFn, grammar: StatementGrammar) -> str:
    """A valid statement with a few random edits (near misses), or a prefix of one."""
    s = list(draw(statements(grammar)))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["insert", "delete", "replace", "truncate"]))
        i = draw(st.integers(0, max(0, len(s) - 1)))
        c = draw(st.sampled_from(_ALPHABET))
        if op == "insert":
            s.insert(i, c)
        elif op == "delete" and s:
            del s[i]
        elif op == "replace" and s:
            s[i] = c
        elif op == "truncate":
            s = s[:i]
    return "".join(s)


@settings(max_examples=400, deadline=None)
@given(st.one_of(statements(G7), mutated(G7), st.text(alphabet=_ALPHABET, max_size=40)))
def test_dfa_equals_re_fullmatch(text: str) -> None:
    assert G7.matches(text) == bool(re.fullmatch(G7.regex, text))


@settings(max_examples=300, deadline=None)
@given(st.one_of(statements(G2), mutated(G2)))
def test_dfa_equals_re_fullmatch_small_grammar(text: str) -> None:
    assert G2.matches(text) == bool(re.fullmatch(G2.regex, text))


@settings(max_examples=400, deadline=None)
@given(mutated(G7))
def test_live_states_are_exactly_regex_prefixes(text: str) -> None:
    """The DFA is alive after ``text`` iff ``text`` can still be completed (regex partial match)."""
    state = G7.walk(G7.initial_state, text)
    assert (state != DEAD) == bool(regex_mod.fullmatch(G7.regex, text, partial=True))
    if state != DEAD:
        completed = text + G7.completion(state)
        assert re.fullmatch(G7.regex, completed)
        forced = G7.forced(state)
        # The forced text is the only way on: every other next character kills the DFA.
        if forced:
            for c in set(_ALPHABET) | set("abcxyz"):
                assert (G7.step(state, c) != DEAD) == (c == forced[0])
            assert re.fullmatch(G7.regex, text + forced + G7.completion(G7.walk(state, forced)))


def test_vectorised_table_agrees_with_step() -> None:
    table, char_class = G7.table
    dead = G7.num_states
    for s in range(G7.num_states):
        assert table[s, 0] == s  # padding class
        for ch in set(_ALPHABET) | set("abqzBQ"):
            c = char_class.get(ch, 1 if ch.isascii() and ch.isalpha() else 2)
            want = G7.step(s, ch)
            assert table[s, c] == (dead if want == DEAD else want)
    assert (table[dead] == dead).all()
