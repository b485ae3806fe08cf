"""The compact protocol: answer parsing, statement assembly through the shared scorer, roles, batching."""

from __future__ import annotations

from typing import Any

import pytest

from entitylens.activations import compact_cache_prompts
from entitylens.activations.roles import compact_structure, find_roles, tokenize_with_offsets
from entitylens.behavior.compact import CompactDecoding, compact_answers, compact_predictor
from entitylens.behavior.evaluate import EvalConfig, evaluate
from entitylens.errors import EntitylensError
from entitylens.models.testbed.tokenizer import testbed_tokenizer
from entitylens.task.compact import COMPACT, statement_from_answers
from entitylens.task.generate import make_state
from entitylens.task.targeted import eval_states
from entitylens.task.types import Operation
from entitylens.task.world import Scenario

INITIAL = (("car", "map"), (), ("bag",), ("paper", "string"), (), ("apple", "cash", "glass"), ("bottle",))
OPS = (Operation("put", ("coat",), 3), Operation("move", ("map",), 0, 2))


def _state():
    return make_state(Scenario(0, INITIAL, OPS), 2)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" car map ;", ("car", "map")),
        (" ; B3 car", ()),
        (" map car ; B1", ("map", "car")),
        (" car car ;", None),  # repeated object
        (" car map bag coat ;", None),  # over capacity
        (" car B3 ;", None),  # not an object
        (" car map", None),  # never ended
    ],
)
def test_parse_answer(text: str, expected: tuple[str, ...] | None) -> None:
    assert COMPACT.parse_answer(text) == expected


def test_answers_are_scored_by_the_shared_scorer() -> None:
    state = _state()
    gold = [tuple(c) for c in state.contents]
    assert statement_from_answers(gold[:2]) == "Box 0 contains the car, Box 1 contains nothing."
    answers: list[Any] = list(gold)
    answers[3] = ("paper", "coat", "string")  # any order is right under set scoring
    answers[4] = ("map",)  # wrong
    answers[6] = None  # invalid: left out of the statement
    statement = statement_from_answers(answers)
    res = evaluate(None, [state], EvalConfig(), label="x", predictor=lambda states: [(statement, False)])
    assert [p.correct for p in res.predictions] == [True, True, True, True, False, True, False]
    assert res.predictions[6].prediction is None and res.predictions[3].prediction == (
        "coat",
        "paper",
        "string",
    )
    strict = evaluate(
        None, [state], EvalConfig(score_mode="strict"), label="x", predictor=lambda s: [(statement, False)]
    )
    assert strict.predictions[3].correct is False  # strict mode compares the written order


def test_compact_roles_point_at_the_right_tokens() -> None:
    tok = testbed_tokenizer()
    text = COMPACT.prompt(_state(), 2)
    ids, offsets = tokenize_with_offsets(tok, text, prepend_bos=True)
    pieces = [p.lstrip("Ġ") for p in tok.convert_ids_to_tokens(ids)]
    roles = find_roles(
        text, offsets,
        ["query_box", "query_box_desc", "box5_desc", "op0_object", "op0_box", "op1_object", "op1_box",
         "op1_dest",
         "obj:glass", "last"],
    )  # fmt: skip
    # <s> B0 car map ; B1 ; B2 bag ; B3 paper string ; B4 ; B5 apple cash glass ; B6 bottle ;
    #  0   1   2   3  4  5  6  7   8  9 10  11    12   13 14 15 16  17   18   19  20 21  22   23
    # put coat B3 . move map B0 B2 . | B2
    #  24  25  26 27  28  29 30 31 32 33 34
    expected = {
        "query_box": 34, "query_box_desc": 7, "box5_desc": 16, "op0_object": 25, "op0_box": 26,
        "op1_object": 29, "op1_box": 30, "op1_dest": 31, "obj:glass": 19, "last": 34,
    }  # fmt: skip
    assert roles == expected
    assert pieces[34] == "B2" and pieces[7] == "B2" and pieces[25] == "coat"
    assert compact_structure(text).query_contains is None
    with pytest.raises(EntitylensError, match="not present"):
        find_roles(text, offsets, ["op2_object"])
    assert find_roles(text, offsets, ["op2_object"], allow_missing=True) == {"op2_object": None}
    with pytest.raises(EntitylensError, match="not a compact prompt"):
        compact_structure("Box 0 contains the car. Box 0 contains")


def test_cache_prompts_carry_the_row_metadata() -> None:
    state = _state()
    rows = compact_cache_prompts([state])
    assert [r.row_id for r in rows] == [f"{state.state_id}:{b}" for b in range(7)]
    assert rows[2].text == COMPACT.prompt(state, 2)
    assert rows[2].meta["gold"] == ["bag", "map"] and rows[2].meta["numops"] == 1
    assert rows[3].meta["protocol"] == "compact"


def test_decoding_is_batch_and_backend_invariant(shipped_stem: Any) -> None:
    states = eval_states(seed=11, num_states=6)
    big = compact_answers(shipped_stem, states, decoding=CompactDecoding(batch_size=64))
    one = compact_answers(shipped_stem, states[:3], decoding=CompactDecoding(batch_size=1))
    bridge = compact_answers(shipped_stem, states[:2], decoding=CompactDecoding(batch_size=5, backend="bridge"))
    assert one == big[:3] and bridge == big[:2]


def test_compact_protocol_through_evaluate_matches_gold_driven_rows(shipped_stem: Any) -> None:
    states = eval_states(seed=12, num_states=5)
    res = evaluate(None, states, EvalConfig(), label="stem", predictor=compact_predictor(shipped_stem))
    answers = compact_answers(shipped_stem, states)
    by_row = {(p.state_id, p.box): p for p in res.predictions}
    for s, ans in zip(states, answers):
        for b, a in enumerate(ans):
            p = by_row[(s.state_id, b)]
            assert p.correct == (a is not None and sorted(a) == sorted(s.contents[b]))


def test_the_papers_protocol_runs_on_a_testbed_model(shipped_stem: Any) -> None:
    state = make_state(Scenario(0, INITIAL, ()), 0)
    res = evaluate(shipped_stem, [state], EvalConfig(chat="never", budget_margin=0))
    assert len(res.predictions) == 7
    assert res.predictions[0].statement.startswith("\nStatement: Box 0 contains")
