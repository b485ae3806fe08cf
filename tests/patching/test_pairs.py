"""Text pairs from boxes datasets: validity by replay, hand-checked golds, role alignment, determinism, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from entitylens.activations.roles import parse_prompt, role_span
from entitylens.errors import EntitylensError
from entitylens.patching import (
    PAIR_KINDS,
    PatchPair,
    TextPair,
    build_pairs,
    read_pairs,
    read_patch_pairs,
    to_patch_pairs,
    tokenizer_fingerprint,
    write_pairs,
    write_patch_pairs,
)
from entitylens.task.generate import GeneratorConfig, generate_states, make_state
from entitylens.task.text import parse_context
from entitylens.task.types import Operation
from entitylens.task.vocab import BNC_OBJECTS
from entitylens.task.world import Scenario

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
P24_FILE = SHARED / "anchors/finetuning/box_datasets/no_instructions/alternative/Random/3/train.jsonl"

# A hand-written state. Initial: Box 0 car | Box 1 map | Box 2 book, key | Box 3 - | Box 4 bag | Box 5 - | Box 6 coat.
INITIAL = (("car",), ("map",), ("book", "key"), (), ("bag",), (), ("coat",))
OPS = (
    Operation("move", ("car",), 0, 3),  # Box 0 -> nothing, Box 3 -> car
    Operation("put", ("apple",), 5),  # Box 5 -> apple
    Operation("remove", ("key",), 2),  # Box 2 -> book
)
# Gold contents after all three operations, worked out by hand.
HAND_GOLD = {0: (), 1: ("map",), 2: ("book",), 3: ("car",), 4: ("bag",), 5: ("apple",), 6: ("coat",)}
UNTOUCHED_INITIAL = {"map", "book", "bag", "coat"}  # initial objects no operation mentions


def answer(contents: tuple[str, ...]) -> str:
    return " nothing" if not contents else " " + " and ".join(f"the {o}" for o in sorted(contents))


@pytest.fixture(scope="module")
def state() -> Any:
    return make_state(Scenario(sample_id=7, initial=INITIAL, operations=OPS), 3)


@pytest.fixture(scope="module")
def states() -> list[Any]:
    return generate_states(GeneratorConfig(seed=3, num_states=40))


def world_of(prompt: str) -> Any:
    """Parse a prompt's context with the task module's own parser (it replays and validates every operation)."""
    return parse_context(prompt[: prompt.rindex(".") + 1])


# --------------------------------------------------------------------------------------------- validity


def test_hand_state_golds_match_the_hand_replay(state: Any) -> None:
    assert state.contents == tuple(HAND_GOLD[b] for b in range(7))
    for kind in ("op_object", "op_box", "init_object", "drop_op"):
        for seed in range(6):
            (pair,) = build_pairs([state], kind, seed=seed)
            box = pair.query_box
            # the clean side is the hand-written world
            assert pair.clean_answer == answer(HAND_GOLD[box])
            assert pair.clean_prompt.endswith(f". Box {box} contains")
            clean = world_of(pair.clean_prompt)
            assert clean.initial == INITIAL and clean.operations == OPS
            # the corrupted world is valid (parse_context replays it) and its gold is the corrupted answer
            corr = world_of(pair.corrupted_prompt)
            assert pair.corrupted_answer == answer(corr.boxes[box])
            assert pair.corrupted_answer != pair.clean_answer
            assert pair.meta["clean_contents"] == list(HAND_GOLD[box])


def test_each_kind_changes_exactly_what_it_says(state: Any) -> None:
    for seed in range(8):
        (p,) = build_pairs([state], "op_object", seed=seed)
        corr = world_of(p.corrupted_prompt)
        diff = [i for i, (a, b) in enumerate(zip(OPS, corr.operations)) if a != b]
        assert diff == [p.changed_op] and len(corr.operations) == 3 and corr.initial == INITIAL
        a, b = OPS[p.changed_op], corr.operations[p.changed_op]
        assert (a.kind, a.box, a.dest, len(a.objects)) == (b.kind, b.box, b.dest, len(b.objects))
        assert a.objects != b.objects

        (p,) = build_pairs([state], "op_box", seed=seed)
        corr = world_of(p.corrupted_prompt)
        diff = [i for i, (a, b) in enumerate(zip(OPS, corr.operations)) if a != b]
        assert diff == [p.changed_op] and OPS[p.changed_op].kind in ("move", "put")  # a remove cannot change box
        a, b = OPS[p.changed_op], corr.operations[p.changed_op]
        assert a.objects == b.objects and (a.box, a.dest) != (b.box, b.dest)

        (p,) = build_pairs([state], "init_object", seed=seed)
        corr = world_of(p.corrupted_prompt)
        assert corr.operations == OPS and p.changed_op is None
        changed = [(set(a) - set(b), set(b) - set(a)) for a, b in zip(INITIAL, corr.initial) if a != b]
        assert len(changed) == 1
        (old,), (new,) = changed[0]
        assert old in UNTOUCHED_INITIAL and new in BNC_OBJECTS
        assert new not in {o for box in INITIAL for o in box} | {o for op in OPS for o in op.objects}
        assert p.query_box == next(b for b, c in enumerate(INITIAL) if old in c)

        (p,) = build_pairs([state], "drop_op", seed=seed)
        corr = world_of(p.corrupted_prompt)
        assert corr.operations == OPS[: p.changed_op] + OPS[p.changed_op + 1 :]


def test_drop_op_by_hand(state: Any) -> None:
    # Dropping op 0 leaves the car in Box 0 (Box 3 empty); dropping op 1 leaves Box 5 empty; op 2 keeps the key.
    expected = {0: {0: (" nothing", " the car"), 3: (" the car", " nothing")}, 1: {5: (" the apple", " nothing")},
                2: {2: (" the book", " the book and the key")}}  # fmt: skip
    seen = set()
    for seed in range(20):
        (p,) = build_pairs([state], "drop_op", seed=seed)
        if p.changed_op == 2:
            # " the book" is a prefix of " the book and the key": no distinguishing token, so never queried
            pytest.fail("drop_op chose a pair whose answers have no distinguishing word")
        assert (p.clean_answer, p.corrupted_answer) == expected[p.changed_op][p.query_box]
        seen.add((p.changed_op, p.query_box))
    assert seen == {(0, 0), (0, 3), (1, 5)}


def test_generated_dataset_all_kinds_valid(states: list[Any]) -> None:
    for kind in ("op_object", "op_box", "init_object", "drop_op"):
        pairs = build_pairs(states, kind, seed=1, max_pairs=15)
        assert 5 <= len(pairs) <= 15
        assert len({p.state_id for p in pairs}) == len(pairs)
        by_id = {s.state_id: s for s in states}
        for p in pairs:
            s = by_id[p.state_id]
            assert p.clean_answer == answer(s.contents[p.query_box])  # dataset gold
            corr = world_of(p.corrupted_prompt)
            assert p.corrupted_answer == answer(corr.boxes[p.query_box])
            assert p.clean_answer != p.corrupted_answer
            for side in (p.clean_prompt, p.corrupted_prompt):  # every listed role exists on both sides
                structure = parse_prompt(side)
                for role in p.roles:
                    assert role in p.role_spans or role_span(structure, role, len(side)) is not None


@pytest.mark.parametrize("variant", ["altforms", "move-contents"])
def test_surface_variants(variant: str, tiny_model: Any) -> None:
    states = generate_states(GeneratorConfig(seed=2, num_states=30, variant=variant, form="t5"))
    noun = "Container" if variant == "altforms" else "Box"
    for kind in ("op_object", "op_box", "init_object", "drop_op"):
        pairs = build_pairs(states, kind, seed=0, max_pairs=4)
        for p in pairs:
            label = chr(65 + p.query_box) if variant == "altforms" else str(p.query_box)
            assert p.clean_prompt.endswith(f". {noun} {label} contains")
            corr = world_of(p.corrupted_prompt)
            assert corr.variant == variant or (variant == "move-contents" and corr.variant == "base")
            assert p.corrupted_answer == answer(corr.boxes[p.query_box])
            assert p.clean_answer == answer(world_of(p.clean_prompt).boxes[p.query_box])
        for tp, pp in zip(pairs, to_patch_pairs(tiny_model, pairs)):
            label = chr(65 + tp.query_box) if variant == "altforms" else str(tp.query_box)
            for ids, roles in ((pp.clean_tokens, pp.clean_roles), (pp.corrupted_tokens, pp.corrupted_roles)):
                assert label in tiny_model.tokenizer.decode([int(ids[roles["query_box"]])])


def test_p24_generated_and_from_file() -> None:
    pairs = build_pairs(None, "p24", seed=0, max_pairs=12)
    assert len(pairs) == 12
    for p in pairs:
        assert p.clean_prompt.endswith(f"Box {p.query_box} contains the")
        assert p.corrupted_prompt.endswith(f"Box {p.corrupted_query_box} contains the")
        assert p.query_box != p.corrupted_query_box
        ctx = p.clean_prompt.rsplit(" Box ", 1)[0]
        assert ctx == p.corrupted_prompt.rsplit(" Box ", 1)[0]
        ctx = "t" + ctx[1:]  # "The X is in ..." -> "the X is in ..."
        # the answer is the object the context puts in the queried box
        assert f"the {p.clean_answer.strip()} is in Box {p.query_box}" in ctx
        assert f"the {p.corrupted_answer.strip()} is in Box {p.corrupted_query_box}" in ctx
        assert {"clean_object", "corrupted_object", "query_box", "last"} <= set(p.roles)
    if not P24_FILE.is_file():
        pytest.skip("../shared anchors are absent")
    from entitylens.task.io import read_p24_jsonl

    items = read_p24_jsonl(P24_FILE)[:60]
    pairs = build_pairs(items, "p24", seed=0)
    assert len(pairs) >= 15
    by_key = {(it.sample_id, it.query_box): it for it in items}
    for p in pairs:
        sid = p.meta["sample_id"]
        a, b = by_key[(sid, p.query_box)], by_key[(sid, p.corrupted_query_box)]
        assert not a.ambiguous and not b.ambiguous
        assert (p.clean_prompt, p.corrupted_prompt) == (a.prompt, b.prompt)
        assert (p.clean_answer, p.corrupted_answer) == (f" {a.answer}", f" {b.answer}")


def test_prefix_is_kept_and_roles_skip_it(state: Any) -> None:
    from entitylens.cli.cache import kst24_prefix

    prefix = kst24_prefix()
    (plain,) = build_pairs([state], "op_object", seed=2)
    (fewshot,) = build_pairs([state], "op_object", seed=2, prefix=prefix)
    assert fewshot.clean_prompt == prefix + plain.clean_prompt
    assert fewshot.corrupted_prompt == prefix + plain.corrupted_prompt
    assert fewshot.roles == plain.roles
    shift = len(prefix)
    for role, (c, x) in plain.role_spans.items():
        assert fewshot.role_spans[role] == ((c[0] + shift, c[1] + shift), (x[0] + shift, x[1] + shift))


# ------------------------------------------------------------------------------------- role alignment


def decode(tok: Any, ids: torch.Tensor, pos: int) -> str:
    return tok.decode([int(ids[pos])])


def test_roles_align_by_name_across_lengths(tiny_model: Any, states: list[Any]) -> None:
    tok = tiny_model.tokenizer
    text_pairs = build_pairs(states, "drop_op", seed=0, max_pairs=6)
    patch_pairs = to_patch_pairs(tiny_model, text_pairs)
    for tp, pp in zip(text_pairs, patch_pairs):
        assert isinstance(pp, PatchPair) and pp.name == tp.name
        assert len(pp.clean_tokens) > len(pp.corrupted_tokens)  # the corrupted prompt lost a sentence
        # the prompt part is exactly what the bridge's own to_tokens produces
        for prompt, ids in ((tp.clean_prompt, pp.clean_tokens), (tp.corrupted_prompt, pp.corrupted_tokens)):
            ref = tiny_model.to_tokens(prompt)[0]
            assert torch.equal(ids[: len(ref)], ref)
        qc, qx = pp.clean_roles["query_box"], pp.corrupted_roles["query_box"]
        assert qc != qx  # positions differ ...
        assert decode(tok, pp.clean_tokens, qc).strip() == str(tp.query_box)  # ... the token is the same label
        assert decode(tok, pp.corrupted_tokens, qx).strip() == str(tp.query_box)
        assert decode(tok, pp.clean_tokens, pp.clean_roles["query_contains"]).strip() == "contains"
        assert decode(tok, pp.corrupted_tokens, pp.corrupted_roles["query_contains"]).strip() == "contains"
        assert pp.clean_roles["last"] == len(pp.clean_tokens) - 1
        assert pp.corrupted_roles["last"] == len(pp.corrupted_tokens) - 1
        # operations before the dropped one sit at the same tokens on both sides
        for j in range(tp.changed_op):
            role = f"op{j}_box"
            assert pp.clean_roles[role] == pp.corrupted_roles[role]
        assert f"op{tp.changed_op}_box" not in pp.clean_roles  # later operations are not aligned by index


def test_changed_object_alias_points_at_the_changed_words(tiny_model: Any, states: list[Any]) -> None:
    tok = tiny_model.tokenizer
    for kind in ("op_object", "init_object"):
        text_pairs = build_pairs(states, kind, seed=4, max_pairs=5)
        for tp, pp in zip(text_pairs, to_patch_pairs(tiny_model, text_pairs)):
            (cs, ce), (xs, xe) = tp.role_spans["changed_object"]
            old, new = tp.clean_prompt[cs:ce], tp.corrupted_prompt[xs:xe]
            assert old != new and old in BNC_OBJECTS and new in BNC_OBJECTS
            # the role's token is the last piece of the object name on each side
            assert old.endswith(decode(tok, pp.clean_tokens, pp.clean_roles["changed_object"]).strip())
            assert new.endswith(decode(tok, pp.corrupted_tokens, pp.corrupted_roles["changed_object"]).strip())


def test_answers_are_first_distinguishing_tokens(tiny_model: Any, states: list[Any]) -> None:
    tok = tiny_model.tokenizer
    text_pairs = build_pairs(states, "init_object", seed=0, max_pairs=5)
    for tp, pp in zip(text_pairs, to_patch_pairs(tiny_model, text_pairs)):
        clean_full = tok.decode(pp.clean_tokens.tolist() + [pp.clean_answer], skip_special_tokens=True)
        corr_full = tok.decode(pp.corrupted_tokens.tolist() + [pp.corrupted_answer], skip_special_tokens=True)
        assert (tp.clean_prompt + tp.clean_answer).startswith(clean_full)
        assert (tp.corrupted_prompt + tp.corrupted_answer).startswith(corr_full)


def test_role_selection(tiny_model: Any, states: list[Any]) -> None:
    text_pairs = build_pairs(states, "op_box", seed=0, max_pairs=3)
    pp = to_patch_pairs(tiny_model, text_pairs, roles=["query_box", "changed_box"])
    assert all(set(p.clean_roles) == {"query_box", "changed_box", "last"} for p in pp)
    with pytest.raises(EntitylensError, match=r"role 'op11_box' is missing from the clean prompt"):
        to_patch_pairs(tiny_model, text_pairs, roles=["op11_box"])
    with pytest.raises(EntitylensError, match="unknown role"):
        to_patch_pairs(tiny_model, text_pairs, roles=["nonsense"])


# ----------------------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes(states: list[Any], tmp_path: Path) -> None:
    for kind in PAIR_KINDS:
        data = None if kind == "p24" else states
        a = build_pairs(data, kind, seed=5, max_pairs=10)
        b = build_pairs(data, kind, seed=5, max_pairs=10)
        write_pairs(tmp_path / "a.jsonl", a)
        write_pairs(tmp_path / "b.jsonl", b)
        assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
        other = build_pairs(data, kind, seed=6, max_pairs=10)
        assert [p.to_json() for p in other] != [p.to_json() for p in a]
        back = read_pairs(tmp_path / "a.jsonl")
        assert back == a
        write_pairs(tmp_path / "c.jsonl", back)
        assert (tmp_path / "c.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()


def test_tokenised_pairs_round_trip(tiny_model: Any, states: list[Any], tmp_path: Path) -> None:
    pp = to_patch_pairs(tiny_model, build_pairs(states, "op_object", seed=0, max_pairs=3))
    write_patch_pairs(tmp_path / "t.jsonl", pp)
    back = read_patch_pairs(tmp_path / "t.jsonl", tiny_model.tokenizer)
    for a, b in zip(pp, back):
        assert torch.equal(a.clean_tokens, b.clean_tokens) and torch.equal(a.corrupted_tokens, b.corrupted_tokens)
        assert (a.clean_answer, a.corrupted_answer, a.name) == (b.clean_answer, b.corrupted_answer, b.name)
        assert dict(a.clean_roles) == dict(b.clean_roles) and dict(a.corrupted_roles) == dict(b.corrupted_roles)
        assert b.tokenizer_fingerprint == tokenizer_fingerprint(tiny_model.tokenizer)


# ---------------------------------------------------------------------------------------------- errors


def one_line(e: pytest.ExceptionInfo[EntitylensError]) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_equal_answers_refused(state: Any) -> None:
    (p,) = build_pairs([state], "op_object", seed=0)
    rec = p.to_json()
    rec["corrupted_answer"] = rec["clean_answer"]
    with pytest.raises(EntitylensError) as e:
        TextPair.from_json(rec)
    assert "answers are both" in one_line(e) and "drop the pair" in one_line(e)


def test_role_missing_from_a_side_refused(state: Any) -> None:
    (p,) = build_pairs([state], "drop_op", seed=0)
    rec = p.to_json()
    rec["roles"] = [*rec["roles"], "op2_box"]  # the corrupted prompt has only two operations
    with pytest.raises(EntitylensError) as e:
        TextPair.from_json(rec)
    assert "role 'op2_box' is missing from the corrupted prompt" in one_line(e)


def test_unknown_kind_and_wrong_data(states: list[Any]) -> None:
    with pytest.raises(EntitylensError, match="unknown pair kind 'swap'"):
        build_pairs(states, "swap")
    with pytest.raises(EntitylensError, match="kind p24 needs P24 rows"):
        build_pairs(states, "p24")
    with pytest.raises(EntitylensError, match="needs max_pairs"):
        build_pairs(None, "p24")
    with pytest.raises(EntitylensError, match="needs a boxes dataset"):
        build_pairs(None, "op_box")
    no_ops = [s for s in states if s.num_operations == 0]
    with pytest.raises(EntitylensError, match="no drop_op pair could be built"):
        build_pairs(no_ops, "drop_op")


@pytest.mark.usefixtures("no_shape_checks")
def test_bad_files_name_file_and_line(state: Any, tmp_path: Path, tiny_model: Any) -> None:
    (p,) = build_pairs([state], "op_object", seed=0)
    path = tmp_path / "p.jsonl"
    good = json.dumps(p.to_json())
    path.write_text(good + "\n{not json\n")
    with pytest.raises(EntitylensError, match=r"p\.jsonl line 2: not valid JSON"):
        read_pairs(path)
    bad = p.to_json()
    bad["corrupted_answer"] = bad["clean_answer"]
    path.write_text(good + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(EntitylensError, match=r"p\.jsonl line 2: pair .* answers are both"):
        read_pairs(path)
    # tokenised pairs with another tokenizer's fingerprint
    pp = to_patch_pairs(tiny_model, [p])[0]
    forged = PatchPair(pp.clean_tokens, pp.corrupted_tokens, pp.clean_answer, pp.corrupted_answer,
                       tokenizer_fingerprint="0" * 64, name=pp.name)  # fmt: skip
    write_patch_pairs(tmp_path / "t.jsonl", [forged])
    with pytest.raises(EntitylensError, match=r"t\.jsonl line 1: pairs were tokenised with another tokenizer"):
        read_patch_pairs(tmp_path / "t.jsonl", tiny_model.tokenizer)
    with pytest.raises(EntitylensError, match="holds tokenised pairs"):
        read_pairs(tmp_path / "t.jsonl")
    # a write that fails leaves the earlier file untouched
    before = path.read_bytes()
    with pytest.raises(EntitylensError, match="not a TextPair"):
        write_pairs(path, [p, "oops"])  # type: ignore[list-item]
    assert path.read_bytes() == before


def test_smollm2_tokenizer_mismatch(smollm2_tokenizer: Any, tiny_model: Any, state: Any, tmp_path: Path) -> None:
    from entitylens.patching import patch_grid

    pairs = build_pairs([state], "op_object", seed=0)
    smol = to_patch_pairs(smollm2_tokenizer, pairs, prepend_bos=False)
    assert smol[0].tokenizer_fingerprint == tokenizer_fingerprint(smollm2_tokenizer)
    write_patch_pairs(tmp_path / "smol.jsonl", smol)
    with pytest.raises(EntitylensError, match="another tokenizer"):
        read_patch_pairs(tmp_path / "smol.jsonl", tiny_model.tokenizer)
    with pytest.raises(EntitylensError, match="different tokenizer"):
        patch_grid(tiny_model, smol, "resid_pre", roles=["last"])
