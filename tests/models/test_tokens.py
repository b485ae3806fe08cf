"""Object token ids (multi-token objects) and BOS-consistent encoding."""

from __future__ import annotations

import pytest

from entitylens.errors import EntitylensError
from entitylens.models import encode, first_token_ids, object_token_ids, shared_first_tokens, text_token_ids
from entitylens.models.tiny import task_objects

OBJECTS = ("book", "car", "paper", "bottle", "bag", "map", "eggnog", "magnet", "umbrella", "television")


def test_smollm2_object_ids_roundtrip_and_multi_token(smollm2_tokenizer) -> None:
    tok = smollm2_tokenizer
    spaced = object_token_ids(tok, OBJECTS)
    bare = object_token_ids(tok, OBJECTS, leading_space=False)
    for obj in OBJECTS:
        assert tok.decode(list(spaced[obj])) == " " + obj
        assert tok.decode(list(bare[obj])) == obj
        # ids are exactly what the object contributes to a prompt
        prompt = tok("Box 1 contains the", add_special_tokens=False)["input_ids"]
        full = tok(f"Box 1 contains the {obj}", add_special_tokens=False)["input_ids"]
        assert tuple(full[len(prompt) :]) == spaced[obj]
    assert len(spaced["car"]) == 1 and len(spaced["bottle"]) == 1
    assert len(spaced["eggnog"]) > 1
    assert first_token_ids(tok, ["eggnog"]) == {"eggnog": spaced["eggnog"][0]}


def test_smollm2_all_task_objects(smollm2_tokenizer) -> None:
    vocab = pytest.importorskip("entitylens.task.vocab")
    common, rare = tuple(vocab.BNC_OBJECTS), tuple(vocab.DISJOINT_OBJECTS)
    ids = object_token_ids(smollm2_tokenizer, common + rare)
    assert all(smollm2_tokenizer.decode(list(v)) == " " + k for k, v in ids.items())
    # SmolLM2 has every common noun as one token; rare nouns are often several
    assert all(len(ids[o]) == 1 for o in common)
    assert any(len(ids[o]) > 1 for o in rare)


def test_accepts_model_or_tokenizer(tiny_model, tiny_tokenizer) -> None:
    assert object_token_ids(tiny_model, OBJECTS) == object_token_ids(tiny_tokenizer, OBJECTS)
    with pytest.raises(EntitylensError, match="has no tokenizer"):
        object_token_ids(object(), OBJECTS)


def test_shared_first_tokens_hand_checked(tiny_tokenizer) -> None:
    ids = object_token_ids(tiny_tokenizer, task_objects())
    firsts = first_token_ids(tiny_tokenizer, task_objects())
    expected: dict[int, list[str]] = {}
    for obj, toks in ids.items():
        assert firsts[obj] == toks[0]
        expected.setdefault(toks[0], []).append(obj)
    assert shared_first_tokens(tiny_tokenizer, task_objects()) == {
        t: tuple(objs) for t, objs in expected.items() if len(objs) > 1
    }


def test_empty_object_rejected(tiny_tokenizer) -> None:
    with pytest.raises(EntitylensError, match="empty object name"):
        text_token_ids(tiny_tokenizer, "")


def test_encode_bos_follows_family(tiny_model) -> None:
    tok = tiny_model.tokenizer
    text = "Box 0 contains the car."
    ids = encode(tiny_model, text).tolist()
    assert ids[0] == tok.bos_token_id and ids[1:] == tok(text, add_special_tokens=False)["input_ids"]
    assert ids == tiny_model.to_tokens(text)[0].tolist()
    assert encode(tiny_model, text, bos=False).tolist() == ids[1:]
    # chat-template output already starts with BOS: no second one
    assert encode(tiny_model, "<s>" + text).tolist().count(tok.bos_token_id) == 1
