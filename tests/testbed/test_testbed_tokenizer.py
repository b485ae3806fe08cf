"""The word-level testbed tokenizer: exact round trips, one token per object/label, working offsets."""

from __future__ import annotations

import json

import pytest

from entitylens.activations.roles import find_roles, tokenize_with_offsets
from entitylens.models.testbed.tokenizer import BOX_LABELS, build_tokenizer, testbed_tokenizer, tokenizer_json, word_ids
from entitylens.task.prompts import kst24_prompt, statement_text
from entitylens.task.vocab import BNC_OBJECTS, DISJOINT_OBJECTS

TEXTS = [
    "B0 car map ; B1 ; B2 bag ; B3 paper string ; B4 ; B5 ; B6 bottle ; "
    "put coat B3 . move map B0 B2 . | B3 coat",
    "B0 = [ car , map ] ; B3 . append ( coat ) ; x = B0 . pop ( ) ; assert B3 == { coat , paper } ;",
    "the car is red and old . B3 is a big box . the map looks like a card .",
    kst24_prompt("Box 0 contains the car, Box 1 contains nothing. Move the car from Box 0 to Box 1.")
    + "\nStatement: "
    + statement_text([("car", "map"), ()]),
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_is_exact(text: str) -> None:
    tok = testbed_tokenizer()
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_every_object_and_box_label_is_one_token() -> None:
    tok = testbed_tokenizer()
    objects = BNC_OBJECTS + DISJOINT_OBJECTS
    ids = word_ids(list(objects) + list(BOX_LABELS))
    assert len(set(ids)) == len(objects) + len(BOX_LABELS)
    # in the K&S sentence form too: " the car," -> [" the", " car", ","]
    for obj in objects:
        pieces = tok.convert_ids_to_tokens(tok(f"Put the {obj}, then", add_special_tokens=False)["input_ids"])
        assert pieces[2] == "Ġ" + obj


def test_unknown_word_is_unk_and_the_build_is_deterministic() -> None:
    tok = testbed_tokenizer()
    assert tok(" zyzzyva", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]
    assert tokenizer_json() == build_tokenizer().backend_tokenizer.to_str()
    vocab = json.loads(tokenizer_json())["model"]["vocab"]
    assert [vocab[t] for t in ("<pad>", "<s>", "</s>", "<unk>")] == [0, 1, 2, 3]


def test_offsets_let_the_role_finder_work_on_kst24_text() -> None:
    tok = testbed_tokenizer()
    text = (
        "Box 0 contains the car, Box 1 contains the map and the bag. Put the coat into Box 1. Box 1 contains"
    )
    ids, offsets = tokenize_with_offsets(tok, text, prepend_bos=True)
    roles = find_roles(
        text, offsets, ["query_box", "query_box_desc", "op0_object", "op0_box", "obj:bag", "last"]
    )
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[roles["query_box"]] == "Ġ1" and roles["query_box"] == len(ids) - 2
    assert pieces[roles["query_box_desc"]] == "Ġ1" and roles["query_box_desc"] == 8
    assert pieces[roles["op0_object"]] == "Ġcoat"
    assert pieces[roles["op0_box"]] == "Ġ1"
    assert pieces[roles["obj:bag"]] == "Ġbag"
    assert roles["last"] == len(ids) - 1
