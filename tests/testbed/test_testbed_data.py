"""Testbed data generators: compact rendering, boxes episodes, code programs, prose; determinism."""

from __future__ import annotations

import random

import pytest

from entitylens.errors import EntitylensError
from entitylens.models.testbed.tokenizer import OBJECTS, testbed_tokenizer
from entitylens.task.compact import compact_prompt
from entitylens.task.generate import make_state
from entitylens.task.types import Operation
from entitylens.task.world import Scenario
from entitylens.testbed.data import (
    boxes_episode,
    code_program,
    encode_words,
    filler_episode,
    prose_text,
)

INITIAL = (("car", "map"), (), ("bag",), ("paper", "string"), (), ("apple", "cash", "glass"), ("bottle",))


def _state(k: int):
    ops = (
        Operation("put", ("coat",), 3),
        Operation("move", ("map",), 0, 2),
        Operation("remove", ("cash",), 5),
    )
    return make_state(Scenario(0, INITIAL, ops), k)


def test_compact_prompt_by_hand() -> None:
    assert compact_prompt(_state(0), 5) == (
        "B0 car map ; B1 ; B2 bag ; B3 paper string ; B4 ; B5 apple cash glass ; B6 bottle ; | B5"
    )
    assert compact_prompt(_state(3), 2) == (
        "B0 car map ; B1 ; B2 bag ; B3 paper string ; B4 ; B5 apple cash glass ; B6 bottle ; "
        "put coat B3 . move map B0 B2 . remove cash B5 . | B2"
    )
    with pytest.raises(EntitylensError, match="out of range"):
        compact_prompt(_state(0), 7)


def _simulate_compact(words: list[str]) -> dict[str, list[str]]:
    """An independent simulator of the compact text (description + operations) with Python lists."""
    boxes: dict[str, list[str]] = {}
    i = 0
    while words[i] != "|" and words[i].startswith("B") and words[i] not in boxes:
        label, i = words[i], i + 1
        boxes[label] = []
        while words[i] != ";":
            boxes[label].append(words[i])
            i += 1
        i += 1
    while words[i] != "|":
        verb, j = words[i], i + 1
        objs = []
        while not words[j].startswith("B"):
            objs.append(words[j])
            j += 1
        labels = []
        while words[j] != ".":
            labels.append(words[j])
            j += 1
        if verb in ("remove", "move"):
            for o in objs:
                boxes[labels[0]].remove(o)
        if verb in ("put", "move"):
            boxes[labels[-1]].extend(objs)
        i = j + 1
    return boxes


def test_boxes_episodes_answer_every_box_correctly_and_are_deterministic() -> None:
    tok = testbed_tokenizer()
    seen_ops = set()
    for index in range(60):
        ep = boxes_episode(5, index, (1, 1, 1))
        assert ep == boxes_episode(5, index, (1, 1, 1))
        text = tok.decode(ep.ids, skip_special_tokens=True)
        assert tok(text)["input_ids"] == list(ep.ids)
        words = text.split()
        seen_ops.add(sum(w in ("put", "move", "remove") for w in words))
        truth = _simulate_compact(words)
        queries = words[words.index("|") + 1 :]
        answered: dict[str, list[str]] = {}
        j = 0
        while j < len(queries):
            label, j = queries[j], j + 1
            answered[label] = []
            while queries[j] != ";":
                answered[label].append(queries[j])
                j += 1
            j += 1
        assert answered.keys() == truth.keys() and len(truth) == 7
        assert answered == truth  # list order: initial objects as described, then arrivals in order
        # the answer mask flags exactly the answer tokens (objects and ';' after each query label)
        flagged = [w for w, a in zip(["<s>", *words], ep.answer) if a]
        assert flagged == [w for w in queries if not w.startswith("B")]
    assert seen_ops == {0, 1, 2}
    assert boxes_episode(5, 0, (1, 1, 1)) != boxes_episode(6, 0, (1, 1, 1))


def test_code_programs_are_valid_python_whose_asserts_hold() -> None:
    names = {o: o for o in OBJECTS}
    n_asserts = 0
    for i in range(80):
        words = code_program(random.Random(i), 200)
        src = " ".join(words)
        exec(compile(src, "<code arm>", "exec"), dict(names))  # every assert holds
        n_asserts += words.count("assert")
        assert encode_words(words) == testbed_tokenizer()(src)["input_ids"]
    assert n_asserts > 200
    # and the asserts do check something: corrupt one and it fails
    words = code_program(random.Random(3), 200)
    k = words.index("assert")
    end = words.index(";", k)
    obj = next((w for w in words[k:end] if w in names), None)
    if obj is None:  # an empty container: claim it holds something
        bad = words[: k + 3] + ["[", "car", "]"] + words[end:]
    else:
        bad = [
            w if j != words.index(obj, k) else ("car" if obj != "car" else "map") for j, w in enumerate(words)
        ]
    with pytest.raises(AssertionError):
        exec(" ".join(bad), dict(names))


def test_prose_has_no_state_changes() -> None:
    words = prose_text(random.Random(0), 2000)
    for banned in ("put", "move", "remove", "append", "assert", "=", "|", ";"):
        assert banned not in words
    assert set(OBJECTS) & set(words)


@pytest.mark.parametrize("source", ["code", "prose"])
def test_filler_rows_have_exactly_the_requested_length(source: str) -> None:
    for length in (2, 17, 96):
        row = filler_episode(source, 0, 4, length)
        assert len(row) == length and not any(row.answer) and row.source == source
        assert row == filler_episode(source, 0, 4, length)
    assert filler_episode(source, 0, 4, 96) != filler_episode(source, 0, 5, 96)
    with pytest.raises(EntitylensError, match="unknown filler"):
        filler_episode("boxes", 0, 0, 10)


def test_encode_words_rejects_unknown_words() -> None:
    with pytest.raises(EntitylensError, match="not a token"):
        encode_words(["B0", "zyzzyva"])
