"""Causal-model answers of pairs: hand-worked cross-query pairs, replay checks, tokens, and the swap-order fact."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from entitylens.errors import EntitylensError
from entitylens.patching.pair_build import build_pairs, compact_pairs
from entitylens.patching.pair_io import read_pairs, read_patch_pairs, write_pairs, write_patch_pairs
from entitylens.patching.pair_tokens import to_patch_pairs
from entitylens.patching.text_pair import TextPair
from entitylens.task.generate import GeneratorConfig, generate_states, make_state
from entitylens.task.text import box_name, parse_context
from entitylens.task.types import Operation
from entitylens.task.world import Scenario, replay

KS_KINDS = ("op_object", "op_box", "init_object", "drop_op")


def answer(contents: tuple[str, ...]) -> str:
    return " nothing" if not contents else " " + " and ".join(f"the {o}" for o in sorted(contents))


def world_of(prompt: str) -> Any:
    """The task module's own parser replays the prompt's context (independent of the pair builder)."""
    return parse_context(prompt[: prompt.rindex(".") + 1]).boxes


@pytest.fixture(scope="module")
def states() -> list[Any]:
    return generate_states(GeneratorConfig(seed=3, num_states=60))


def test_hand_worked_cross_query_pair() -> None:
    # Box 0 holds the car and the map, Box 1 the bell; one operation moves the car to Box 2.
    # op_object's only edit moves the map instead. Worked out by hand:
    #   clean world (car moved):     Box 0 map, Box 1 bell, Box 2 car
    #   corrupted world (map moved): Box 0 car, Box 1 bell, Box 2 map
    # The corrupted side queries a changed box (0 or 2); the counterfactual answer is the clean world at that box.
    # The clean side must query a box whose answer parts from the corrupted one at the same word as the
    # counterfactual does ("the <x>"), with another object there: only Box 1 ("the bell") qualifies.
    initial = (("car", "map"), ("bell",), (), (), (), (), ())
    state = make_state(Scenario(sample_id=1, initial=initial, operations=(Operation("move", ("car",), 0, 2),)), 1)
    expected = {0: (" the bell", " the car", " the map"), 2: (" the bell", " the map", " the car")}
    seen = set()
    for seed in range(8):
        (tp,) = build_pairs([state], "op_object", seed=seed, cross_query=True)
        assert tp.query_box == 1 and tp.corrupted_query_box in expected
        assert (tp.clean_answer, tp.corrupted_answer, tp.counterfactual_answer) == expected[tp.corrupted_query_box]
        assert tp.clean_prompt.endswith("Box 1 contains")
        assert tp.corrupted_prompt.endswith(f"Box {tp.corrupted_query_box} contains")
        assert tp.variable == "op0.object" and tp.changed_op == 0
        seen.add(tp.corrupted_query_box)
        (same,) = build_pairs([state], "op_object", seed=seed)
        assert same.counterfactual_answer == same.clean_answer and same.corrupted_query_box is None
    assert seen == {0, 2}


@pytest.mark.parametrize("kind", KS_KINDS)
def test_counterfactual_answers_match_an_independent_replay(states: list[Any], kind: str) -> None:
    for cross in (False, True):
        pairs = build_pairs(states, kind, seed=1, max_pairs=12, cross_query=cross)
        for tp in pairs:
            qx = tp.query_box if tp.corrupted_query_box is None else tp.corrupted_query_box
            clean, corr = world_of(tp.clean_prompt), world_of(tp.corrupted_prompt)
            assert tp.clean_answer == answer(clean[tp.query_box])
            assert tp.corrupted_answer == answer(corr[qx])
            assert tp.counterfactual_answer == answer(clean[qx])  # the clean context, asked the corrupted question
            assert tp.variable and tp.variable.split(".")[0] in {f"op{tp.changed_op}", "initial"}
            if cross:
                assert tp.corrupted_query_box not in (None, tp.query_box)
                assert tp.counterfactual_answer.split() != tp.clean_answer.split()
                assert tp.clean_prompt.endswith(f"{box_name(tp.query_box, 'base')} contains")
            else:
                assert tp.counterfactual_answer == tp.clean_answer
        if cross:
            assert len(pairs) >= 3, kind


def test_counterfactual_tokens_and_round_trips(tiny_model: Any, states: list[Any], tmp_path: Path) -> None:
    tok = tiny_model.tokenizer
    text = build_pairs(states, "op_object", seed=2, max_pairs=8, cross_query=True)
    write_pairs(tmp_path / "p.jsonl", text)
    assert read_pairs(tmp_path / "p.jsonl") == text
    pp = to_patch_pairs(tiny_model, text)
    for tp, p in zip(text, pp, strict=True):
        # the scored token: the corrupted prompt plus the answers' shared words, then the counterfactual's next word
        k = next(i for i, (a, b) in enumerate(zip(tp.corrupted_answer.split(), tp.counterfactual_answer.split()))
                 if a != b)
        shared = "".join(f" {w}" for w in tp.corrupted_answer.split()[:k])
        head = tok(tp.corrupted_prompt + shared, add_special_tokens=False)["input_ids"]
        full = tok(tp.corrupted_prompt + tp.counterfactual_answer, add_special_tokens=False)["input_ids"]
        assert p.counterfactual_answer == full[len(head)]
        assert p.counterfactual_answer not in (p.corrupted_answer, p.clean_answer)
    write_patch_pairs(tmp_path / "t.jsonl", pp)
    assert [p.counterfactual_answer for p in read_patch_pairs(tmp_path / "t.jsonl", tok)] == [
        p.counterfactual_answer for p in pp]
    plain = to_patch_pairs(tiny_model, build_pairs(states, "op_box", seed=2, max_pairs=4))
    assert all(p.counterfactual_answer == p.clean_answer for p in plain)


def test_old_pairs_have_no_counterfactual_and_bad_ones_are_refused(states: list[Any], tiny_model: Any) -> None:
    (tp,) = build_pairs(states, "op_object", seed=0, max_pairs=1)
    rec = tp.to_json()
    del rec["counterfactual_answer"], rec["variable"]
    old = TextPair.from_json(rec)
    assert old.counterfactual_answer is None
    assert to_patch_pairs(tiny_model, [old])[0].counterfactual_answer is None
    with pytest.raises(EntitylensError, match="equals the corrupted answer"):
        TextPair.from_json({**tp.to_json(), "counterfactual_answer": tp.corrupted_answer})
    with pytest.raises(EntitylensError, match="does not part from the corrupted answer"):
        to_patch_pairs(tiny_model, [TextPair.from_json({**tp.to_json(), "counterfactual_answer": " nothing at all"})])
    with pytest.raises(EntitylensError, match="p24 pairs already query two boxes"):
        build_pairs(None, "p24", max_pairs=2, cross_query=True)


def test_compact_cross_pairs_keep_the_causal_answer(states: list[Any]) -> None:
    text = build_pairs(states, "op_box", seed=4, max_pairs=10, cross_query=True)
    compact = compact_pairs(text)
    assert compact
    by_name = {tp.name: tp for tp in text}
    for cp in compact:
        tp = by_name[cp.name]
        assert cp.corrupted_query_box == tp.corrupted_query_box and cp.query_box == tp.query_box
        assert cp.clean_prompt.endswith(f"| B{tp.query_box}") and cp.corrupted_prompt.endswith(
            f"| B{tp.corrupted_query_box}")
        # the same objects as the K&S counterfactual answer, listed in the compact form
        assert set(cp.counterfactual_answer.split()) - {";"} == set(tp.meta["counterfactual_contents"])
        assert set(cp.corrupted_answer.split()) - {";"} == set(tp.meta["corrupted_contents"])


def test_swapping_two_valid_operations_never_changes_the_final_state(states: list[Any]) -> None:
    """Why there is no order-swap pair kind: in this task the order of two operations is no counterfactual."""
    swaps = 0
    for st in states:
        ops = st.operations
        for i, j in itertools.combinations(range(len(ops)), 2):
            swapped = list(ops)
            swapped[i], swapped[j] = ops[j], ops[i]
            try:
                final = replay(st.initial, swapped)[-1]
            except EntitylensError:
                continue  # the swap made an operation impossible (e.g. removing an object before it arrives)
            swaps += 1
            assert final == replay(st.initial, ops)[-1]
    assert swaps > 100
