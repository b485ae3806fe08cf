"""Token roles: hand-computed indices, decoding checks on several tokenizers, generated states, errors."""

from __future__ import annotations

import functools
from typing import Any

import pytest
from activations_helpers import INITIAL, make_state, sample_states
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from entitylens.activations.cache import build_prompts
from entitylens.activations.roles import (
    ROLE_CATALOGUE,
    find_roles,
    parse_prompt,
    span_to_token,
    tokenize_with_offsets,
    validate_roles,
)
from entitylens.cli.cache import kst24_prefix
from entitylens.errors import EntitylensError
from entitylens.task.types import BoxRow, Operation
from entitylens.task.vocab import BNC_OBJECTS, DISJOINT_OBJECTS
from entitylens.task.world import sample_scenario

# ----------------------------------------------------------------------------------------- tokenizers


@functools.lru_cache(maxsize=1)
def word_tokenizer() -> Any:
    """Word-level tokenizer (split on words and punctuation): token indices can be counted by hand."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "Box Container 0 1 2 3 4 5 6 A B C contains the car map nothing Move from to , . and is in are"
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", *words.split()])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>")


@functools.lru_cache(maxsize=1)
def metaspace_tokenizer() -> Any:
    """A SentencePiece-style BPE ('▁' word markers, offsets that include the space), trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    # Structure words only: object names ("eggnog", "otamatone") stay split into several pieces.
    corpus = [
        "Box 0 contains the car and the map, Box 1 contains nothing, Box 2 is empty.",
        "Move the car from Box 3 to Box 4. Remove the map from Box 5. Put the car into Box 6.",
        "The car is in Container A, there is nothing in Container B. Pick up the map in Container C and",
        "place it into Container D. Take the car out of Container E. Place the map inside Container F.",
    ]
    import string

    alphabet = list(string.ascii_letters + string.digits + ".,")
    trainer = trainers.BpeTrainer(
        vocab_size=160, special_tokens=["<unk>", "<s>"], initial_alphabet=alphabet, show_progress=False
    )
    tk.train_from_iterator(corpus * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>")


@pytest.fixture(scope="module", params=["tiny-bpe-bos", "tiny-bpe-nobos", "metaspace", "smollm2"])
def any_tokenizer(request: pytest.FixtureRequest) -> tuple[Any, bool]:
    """(tokenizer, prepend_bos) for every tokenizer family the roles must work with."""
    if request.param == "smollm2":
        return request.getfixturevalue("smollm2_tokenizer"), False
    if request.param == "metaspace":
        return metaspace_tokenizer(), True
    from entitylens.models import load_tokenizer

    if request.param == "tiny-bpe-bos":
        return load_tokenizer("tiny:llama"), True
    return load_tokenizer("tiny:gpt2"), False


def minimal_cover(tok: Any, ids: list[int], first: int, last: int, name: str) -> bool:
    """``ids[first..last]`` decodes to text containing ``name``, and no shorter sub-range does."""
    text = tok.decode(ids[first : last + 1])
    shorter = [tok.decode(ids[first + 1 : last + 1]), tok.decode(ids[first:last])] if last > first else []
    return name in text and all(name not in s for s in shorter)


# ------------------------------------------------------------------------------------ hand-computed


def test_hand_computed_indices_word_tokenizer() -> None:
    text = "Box 0 contains the car, Box 1 contains nothing. Move the car from Box 0 to Box 1. Box 1 contains"
    # tokens: Box0 01 contains2 the3 car4 ,5 Box6 17 contains8 nothing9 .10 Move11 the12 car13 from14
    #         Box15 016 to17 Box18 119 .20 Box21 122 contains23
    tok = word_tokenizer()
    _, offsets = tokenize_with_offsets(tok, text)
    assert len(offsets) == 24
    roles = find_roles(
        text,
        offsets,
        [
            "query_box",
            "query_contains",
            "last",
            "box0_desc",
            "box1_desc",
            "query_box_desc",
            "op0_object",
            "op0_object_first",
            "op0_box",
            "op0_dest",
            "obj:car",
        ],
    )
    assert roles == {
        "query_box": 22,
        "query_contains": 23,
        "last": 23,
        "box0_desc": 1,
        "box1_desc": 7,
        "query_box_desc": 7,
        "op0_object": 13,
        "op0_object_first": 13,
        "op0_box": 16,
        "op0_dest": 19,
        "obj:car": 4,
    }
    # With BOS in front every index moves by one and `last` is still the last token.
    ids_bos, offsets_bos = tokenize_with_offsets(tok, text, prepend_bos=True)
    assert ids_bos[0] == tok.bos_token_id and offsets_bos[0] == (0, 0)
    shifted = find_roles(text, offsets_bos, ["query_box", "box0_desc", "last"])
    assert shifted == {"query_box": 23, "box0_desc": 2, "last": 24}


def test_hand_computed_altforms_word_tokenizer() -> None:
    text = "The car is in Container A, there is nothing in Container B. "
    text += "Box 0 contains the map. Container B contains"
    tok = word_tokenizer()
    _, offsets = tokenize_with_offsets(tok, text)
    # The0 car1 is2 in3 Container4 A5 ,6 there7 is8 nothing9 in10 Container11 B12 .13 Box14 015 contains16
    # the17 map18 .19 Container20 B21 contains22 -- "Box 0 contains the map." is no operation, so it is the
    # description of the state and the AltForms sentence before it is ignored.
    roles = find_roles(text, offsets, ["query_box", "last", "box0_desc"], allow_missing=True)
    assert roles == {"query_box": 21, "last": 22, "box0_desc": 15}
    assert find_roles(text, offsets, ["boxA_desc"], allow_missing=True) == {"boxA_desc": None}


def test_span_to_token_hand_offsets() -> None:
    # "Box 13. Box 13 contains" with a tokenizer that merged " 13." into one token and has a BOS (0, 0).
    offsets = [(0, 0), (0, 3), (3, 7), (7, 11), (11, 13), (13, 14), (14, 23)]
    assert span_to_token(offsets, (4, 6)) == 2  # "13" inside the merged " 13."
    assert span_to_token(offsets, (12, 14)) == 5  # "13" split over " 1" and "3": last token
    assert span_to_token(offsets, (12, 14), "first") == 4
    assert span_to_token(offsets, (0, 1), "first") == 1  # the zero-width BOS never matches
    assert span_to_token(offsets, (30, 31)) is None


# --------------------------------------------------------------------------------- real tokenizers


def _check_state_roles(tok: Any, prepend_bos: bool, row: BoxRow) -> None:
    [prompt] = build_prompts([row])
    ids, offsets = tokenize_with_offsets(tok, prompt.text, prepend_bos=prepend_bos)
    state = row.state
    label = (lambda b: chr(65 + b)) if state.variant == "altforms" else str
    roles = ["last", "query_box", "query_contains", "query_box_desc"]
    roles += [f"box{label(b)}_desc" for b in range(state.num_boxes)]
    for i, op in enumerate(state.operations):
        roles += [f"op{i}_box"] + ([f"op{i}_dest"] if op.dest is not None else [])
        if op.kind != "move_contents":
            roles += [f"op{i}_object", f"op{i}_object_first"]
    names = sorted({o for box in state.initial for o in box})
    roles += [f"obj:{name}" for name in names]
    found = find_roles(prompt.text, offsets, roles)

    def dec(i: int) -> str:
        return tok.decode([ids[i]])

    assert found["last"] == len(ids) - 1
    assert "contains" in dec(found["query_contains"]) and found["query_contains"] == found["last"]
    assert label(row.box) in dec(found["query_box"])
    assert found["query_box"] < found["query_contains"]
    assert found["query_box_desc"] == found[f"box{label(row.box)}_desc"]
    desc = [found[f"box{label(b)}_desc"] for b in range(state.num_boxes)]
    assert all(label(b) in dec(p) for b, p in enumerate(desc))
    assert desc == sorted(desc)  # described in box order
    for i, op in enumerate(state.operations):
        assert label(op.box) in dec(found[f"op{i}_box"])
        assert found[f"op{i}_box"] > max(desc)
        if op.dest is not None:
            assert label(op.dest) in dec(found[f"op{i}_dest"])
        if op.kind != "move_contents":
            first, last = found[f"op{i}_object_first"], found[f"op{i}_object"]
            assert minimal_cover(tok, ids, first, last, op.objects[0])
    end = found["op0_box"] if state.operations else found["query_box"]
    for b, box_objects in enumerate(state.initial):
        # Base form: "Box b contains the X" (object after its label); AltForms: "the X is in Container b".
        lo, hi = (desc[b], (desc + [end])[b + 1]) if state.variant != "altforms" else ((-1, *desc)[b], desc[b])
        for name in box_objects:
            last = found[f"obj:{name}"]
            piece = dec(last).strip().rstrip(",.")
            assert lo < last < hi
            assert piece and (name.endswith(piece) or name in piece)


def test_roles_on_sample_states_every_tokenizer(any_tokenizer: tuple[Any, bool]) -> None:
    tok, prepend_bos = any_tokenizer
    for state in sample_states():
        for box in range(state.num_boxes):
            _check_state_roles(tok, prepend_bos, BoxRow(state, box))


def test_multi_token_objects_split(any_tokenizer: tuple[Any, bool]) -> None:
    """The sample objects really are multi-token for each tokenizer (so the checks above mean something)."""
    tok, prepend_bos = any_tokenizer
    state = sample_states()[2]  # ops: move eggnog, remove bottle+otamatone
    [prompt] = build_prompts([BoxRow(state, 0)])
    ids, offsets = tokenize_with_offsets(tok, prompt.text, prepend_bos=prepend_bos)
    found = find_roles(prompt.text, offsets, ["op0_object", "op0_object_first", "obj:otamatone"])
    assert found["op0_object"] > found["op0_object_first"]  # eggnog
    assert minimal_cover(tok, ids, found["op0_object_first"], found["op0_object"], "eggnog")
    assert "otamatone" not in tok.decode([ids[found["obj:otamatone"]]])


def test_bridge_tokens_match_to_tokens(tiny_model: Any, tiny_gpt2: Any) -> None:
    """Our tokenization (ids + BOS rule) is exactly what TransformerBridge.to_tokens gives."""
    for bridge in (tiny_model, tiny_gpt2):
        for prompt in build_prompts(sample_states()):
            ids, _ = tokenize_with_offsets(bridge.tokenizer, prompt.text, bridge.cfg.default_prepend_bos)
            assert ids == bridge.to_tokens(prompt.text)[0].tolist()
    assert tiny_model.cfg.default_prepend_bos and not tiny_gpt2.cfg.default_prepend_bos


def test_fewshot_prefix_roles_point_into_the_test_state(tiny_tokenizer: Any) -> None:
    prefix = kst24_prefix()
    state = sample_states()[3]
    row = BoxRow(state, 5)
    [plain] = build_prompts([row])
    [prefixed] = build_prompts([row], prefix=prefix)
    assert prefixed.text == prefix + plain.text and prefix.endswith("Description: ")
    roles = ["query_box", "box0_desc", "box6_desc", "op0_object", "op1_box", "obj:car"]
    ids_p, off_p = tokenize_with_offsets(tiny_tokenizer, prefixed.text, True)
    ids_0, off_0 = tokenize_with_offsets(tiny_tokenizer, plain.text, True)
    a = find_roles(prefixed.text, off_p, roles)
    b = find_roles(plain.text, off_0, roles)
    n_prefix = sum(1 for s, e in off_p if e <= len(prefix) and e > s)
    for r in roles:
        assert a[r] > n_prefix  # never inside the demonstrations (which also describe Box 0 ... Box 6)
        assert tiny_tokenizer.decode([ids_p[a[r]]]) == tiny_tokenizer.decode([ids_0[b[r]]])


def test_altforms_and_move_contents(tiny_tokenizer: Any) -> None:
    ops = (Operation("move", ("eggnog",), 0, 1), Operation("move_contents", ("map",), 2, 4))
    alt = make_state(1, INITIAL, ops, variant="altforms")
    assert "Container" in alt.context and "Pick up the contents of Container C" in alt.context
    mc = make_state(2, INITIAL, ops, variant="move-contents")
    for state in (alt, mc):
        for box in (0, 1, 4):
            _check_state_roles(tiny_tokenizer, True, BoxRow(state, box))
        [prompt] = build_prompts([BoxRow(state, 4)])
        _, offsets = tokenize_with_offsets(tiny_tokenizer, prompt.text, True)
        found = find_roles(prompt.text, offsets, ["op1_object", "op1_box"], allow_missing=True)
        assert found["op1_object"] is None and found["op1_box"] is not None  # contents-move names no object


def test_p24_anchor_file(tiny_tokenizer: Any) -> None:
    from pathlib import Path

    from entitylens.task.io import read_p24_jsonl

    path = (
        Path(__file__).resolve().parents[2]
        / ".."
        / "shared"
        / "anchors/finetuning/box_datasets/no_instructions/alternative/Random/3/train.jsonl"
    )
    if not path.is_file():
        pytest.skip("shared/ anchors are not available")
    import itertools
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        small = Path(d) / "p24.jsonl"
        with open(path, encoding="utf-8") as f:
            small.write_text("".join(itertools.islice(f, 27)), encoding="utf-8")
        items = read_p24_jsonl(small)
    prompts = build_prompts(items)
    assert all(p.text.endswith(" contains the") for p in prompts)
    for item, prompt in zip(items, prompts, strict=True):
        ids, offsets = tokenize_with_offsets(tiny_tokenizer, prompt.text, True)
        found = find_roles(prompt.text, offsets, ["query_box", "query_box_desc", "last", f"obj:{item.answer}"])
        assert item.query_box in tiny_tokenizer.decode([ids[found["query_box"]]])
        assert item.query_box in tiny_tokenizer.decode([ids[found["query_box_desc"]]])
        assert found["query_box_desc"] < found["query_box"] < found["last"]
        assert tiny_tokenizer.decode([ids[found["last"]]]).strip() == "the"
        obj_last = found[f"obj:{item.answer}"]
        # The answer's mention ends its clause "the <answer> is in Box <query_box>" (the last token of it).
        assert prompt.text[offsets[obj_last][1] :].startswith(f" is in Box {item.query_box}")


_VOCAB = tuple(BNC_OBJECTS) + tuple(DISJOINT_OBJECTS)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    index=st.integers(0, 10_000),
    k=st.integers(0, 12),
    box=st.integers(0, 6),
    variant=st.sampled_from(["base", "altforms", "move-contents"]),
    form=st.sampled_from(["fewshot", "t5"]),
)
def test_generated_states(tiny_tokenizer: Any, index: int, k: int, box: int, variant: str, form: str) -> None:
    """Roles agree with the State's own operations on generated scenarios, whatever their text."""
    scen = sample_scenario(3, index, _VOCAB, move_contents=variant == "move-contents")
    state = make_state(index, scen.initial, scen.operations[:k], variant=variant, form=form)
    _check_state_roles(tiny_tokenizer, True, BoxRow(state, box))


# ------------------------------------------------------------------------------------------- errors


def test_missing_role_error_names_row() -> None:
    text = sample_states()[1].context + " Box 2 contains"
    tok = word_tokenizer()
    _, offsets = tokenize_with_offsets(tok, text)
    with pytest.raises(EntitylensError, match=r"role 'op5_object' is not present in row 7:1:2.*--allow-missing-roles"):
        find_roles(text, offsets, ["last", "op5_object"], row="7:1:2")
    assert find_roles(text, offsets, ["op5_object", "op0_box"], allow_missing=True)["op5_object"] is None
    no_query = sample_states()[1].context
    with pytest.raises(EntitylensError, match="'query_box' is not present"):
        find_roles(no_query, tok, ["query_box"])


@pytest.mark.parametrize(
    ("roles", "message"),
    [
        (["query_bx"], r"unknown role 'query_bx'; use one of: last, query_box"),
        (["last", "last"], "listed twice"),
        ([], "no roles given"),
        (["opx_object"], "unknown role"),
    ],
)
def test_bad_roles(roles: list[str], message: str) -> None:
    with pytest.raises(EntitylensError, match=message):
        validate_roles(roles)


def test_catalogue_documented() -> None:
    import entitylens.activations.roles as mod

    for name in ROLE_CATALOGUE:
        assert f"``{name}``" in (mod.__doc__ or "")


def test_parse_prompt_structure() -> None:
    state = sample_states()[3]
    text = state.context + " Box 3 contains"
    s = parse_prompt(text)
    assert s.query_label == "3" and text[slice(*s.query_box)] == "3"
    assert list(s.desc_boxes) == [str(b) for b in range(7)]
    assert len(s.operations) == 3
    assert [text[slice(*span)] for span in s.operations[1].objects] == ["bottle", "otamatone"]
    assert text[slice(*s.operations[0].dest)] == "1"  # type: ignore[misc]
    assert {n: text[slice(*sp)] for n, sp in s.desc_objects.items()} == {o: o for box in INITIAL for o in box}
