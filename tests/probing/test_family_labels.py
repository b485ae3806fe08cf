"""Family-target labels: the world replayed from the prompt text, against hand-worked examples."""

from __future__ import annotations

import pytest
import torch

from entitylens.activations.roles import expand_roles, find_roles, role_span, validate_roles
from entitylens.activations.structure import parse_prompt
from entitylens.errors import EntitylensError
from entitylens.probing.family import family_labels
from entitylens.probing.world import prompt_world

KS = ("Box 0 contains the apple and the bill, Box 1 contains nothing, Box 2 contains the cup, "
      "Box 3 contains the fire extinguisher. "
      "Move the apple and the bill from Box 0 to Box 1. Remove the cup from Box 2. "
      "Put the car and the map into Box 2. Move the contents of Box 1 to Box 0. Remove the bill from Box 0. "
      "Box 0 contains")
ALT = ("The apple and the bill are in Container A, there is nothing in Container B, the cup is in Container C. "
       "Pick up the apple in Container A and place it into Container B. Take the cup out of Container C. "
       "Place the map inside Container C. Container B contains")
COMPACT = "B0 apple bill ; B1 ; B2 cup ; put map B1 . move apple B0 B2 . remove cup B2 . | B2"


def test_ks_replay_hand_worked() -> None:
    w = prompt_world(KS)
    assert w.initial == (("apple", "bill"), (), ("cup",), ("fire extinguisher",))
    # worked by hand, operation by operation
    assert w.states[1] == ((), ("apple", "bill"), ("cup",), ("fire extinguisher",))
    assert w.states[2] == ((), ("apple", "bill"), (), ("fire extinguisher",))
    assert w.states[3] == ((), ("apple", "bill"), ("car", "map"), ("fire extinguisher",))
    assert w.states[4] == (("apple", "bill"), (), ("car", "map"), ("fire extinguisher",))
    assert w.states[5] == (("apple",), (), ("car", "map"), ("fire extinguisher",))
    assert [op.kind for op in w.operations] == ["move", "remove", "put", "move_contents", "remove"]
    assert w.operations[3].objects == ("apple", "bill")  # what box 1 held then
    assert w.query_box == 0
    assert w.numops(0) == 3 and w.numops(2) == 2 and w.numops(3) == 0
    prior = w.prior(0)
    assert prior is not None and prior[0] == ("apple", "bill")  # before the last remove
    assert w.prior(3) is None


def test_tags_hand_worked() -> None:
    w = prompt_world(KS)
    after2 = w.tags(2)  # description, move apple+bill 0->1, remove cup from 2
    assert after2[(0, "apple")] == 2 and after2[(1, "apple")] == 1 and after2[(2, "cup")] == 2
    assert after2[(3, "apple")] == 0 and (0, "car") not in after2  # car is not named before operation 3
    final = w.tags(5)
    assert final[(0, "apple")] == 1  # moved out and back in: present
    assert final[(0, "bill")] == 2  # back in, then removed
    assert final[(1, "bill")] == 2 and final[(2, "map")] == 1 and final[(1, "car")] == 0


def test_altforms_and_compact_replay() -> None:
    w = prompt_world(ALT)
    assert w.initial == (("apple", "bill"), (), ("cup",))
    assert w.final == (("bill",), ("apple",), ("map",))
    assert w.query_box == 1 and w.prior(1) == w.initial
    c = prompt_world(COMPACT)
    assert c.initial == (("apple", "bill"), (), ("cup",))
    assert c.states[1] == (("apple", "bill"), ("map",), ("cup",))
    assert c.final == (("bill",), ("map",), ("apple",))
    assert c.query_box == 2 and c.prior(2) == c.states[2]


def test_contradictory_text_is_one_line_error() -> None:
    with pytest.raises(EntitylensError, match="take only objects that are in the box"):
        prompt_world("Box 0 contains the apple, Box 1 contains nothing. Remove the cup from Box 0. Box 0 contains")
    with pytest.raises(EntitylensError, match="no box description"):
        prompt_world("hello world")


def test_new_roles_point_at_the_right_text() -> None:
    s = parse_prompt(KS)
    for role, text in [("op0_end", "."), ("op0_object1", "bill"), ("op2_object0", "car"),
                       ("box3_object0", "fire extinguisher"), ("box0_object1", "bill"), ("op4_end", ".")]:
        found = role_span(s, role, len(KS))
        assert found is not None and KS[found[0][0]: found[0][1]] == text, role
    end4 = role_span(s, "op4_end", len(KS))
    assert end4 is not None and KS[: end4[0][1]].endswith("Remove the bill from Box 0.")
    assert role_span(s, "op3_object0", len(KS)) is None  # "Move the contents of" names no object
    roles = find_roles(COMPACT, [(m, m + 1) for m in range(len(COMPACT))], ["op1_end", "op1_object0", "box0_object1"])
    assert COMPACT[roles["op1_end"]] == "." and COMPACT[: roles["op1_end"]].endswith("B2 ")
    assert COMPACT[roles["op1_object0"] - 4: roles["op1_object0"] + 1] == "apple"
    assert COMPACT[roles["box0_object1"] - 3: roles["box0_object1"] + 1] == "bill"


def test_expand_role_groups() -> None:
    texts = [COMPACT, "B0 ; B1 cup ; B2 ; remove cup B1 . | B0"]
    roles, grouped = expand_roles(["last", "@mentions", "@op_ends"], texts)
    assert grouped
    assert roles == ("last", "box0_desc", "box1_desc", "box2_desc", "op0_box", "op1_box", "op1_dest", "op2_box",
                     "op0_end", "op1_end", "op2_end")
    objs, _ = expand_roles(["@objects"], texts)
    assert objs == ("box0_object0", "box0_object1", "box1_object0", "box2_object0", "op0_object0", "op1_object0",
                    "op2_object0")
    assert expand_roles(["last"], texts) == (("last",), False)
    validate_roles(["@mentions", "last"], allow_groups=True)
    with pytest.raises(EntitylensError, match="unknown role"):
        validate_roles(["@mentions"])
    with pytest.raises(EntitylensError, match="unknown role group"):
        expand_roles(["@nope"], texts)


def _rows(texts: list[str]) -> list[dict[str, object]]:
    return [{"row_id": f"{i}:0", "state_id": f"{i}:x", "sample_id": i, "text": t} for i, t in enumerate(texts)]


def test_mention_and_incremental_labels() -> None:
    rows = _rows([COMPACT])
    roles = ("box0_desc", "box1_desc", "box2_desc", "op0_box", "op1_box", "op1_dest", "op2_box",
             "op0_end", "op1_end", "op2_end")
    present = {r: torch.ones(1, dtype=torch.bool) for r in roles}
    m = family_labels(rows, "mention", roles=roles, present=present)
    got = {e.role: {m.column_names[j] for j in m.labels[i].nonzero().flatten().tolist()}
           for i, e in enumerate(m.examples)}
    assert got == {"box0_desc": {"apple", "bill"}, "box1_desc": set(), "box2_desc": {"cup"},
                   "op0_box": {"map"},  # B1 after "put map B1"
                   "op1_box": {"bill"}, "op1_dest": {"apple", "cup"},  # after the move
                   "op2_box": {"apple"}}  # after "remove cup B2"
    assert dict(zip([e.role for e in m.examples], m.strata["kind"]))["op1_dest"] == "move_dest"
    inc = family_labels(rows, "incremental", roles=roles, present=present)
    assert [e.role for e in inc.examples] == ["op0_end", "op1_end", "op2_end"]
    last = {inc.column_names[j] for j in inc.labels[2].nonzero().flatten().tolist()}
    assert last == {"box0:bill", "box1:map", "box2:apple"}
    assert inc.examples[1].focus == (0, 2)


def test_tags_labels_and_prior_and_global() -> None:
    rows = _rows([COMPACT])
    roles = ("op1_dest", "op2_box", "op1_object0", "box2_object0")
    present = {r: torch.ones(1, dtype=torch.bool) for r in roles}
    tb = family_labels(rows, "tags_box", roles=roles, present=present)
    by_role = {e.role: i for i, e in enumerate(tb.examples)}
    assert tb.scored is not None

    def tag(i: int, name: str) -> str | None:
        cols = [j for j, n in enumerate(tb.column_names) if n.startswith(f"{name}=")]
        e = tb.column_groups[cols[0]]
        if not bool(tb.scored[i, e]):
            return None
        return tb.column_names[cols[int(tb.labels[i, cols].int().argmax())]].split("=")[1]

    i = by_role["op2_box"]  # box 2 after "remove cup B2": apple present, cup removed, bill/map never
    assert (tag(i, "apple"), tag(i, "cup"), tag(i, "bill"), tag(i, "map")) == ("present", "removed", "never", "never")
    to = family_labels(rows, "tags_object", roles=roles, present=present)
    j = [k for k, e in enumerate(to.examples) if e.role == "op1_object0"][0]  # "apple" in the move, after it
    assert to.examples[j].obj == "apple"
    assert {to.column_names[c] for c in to.labels[j].nonzero().flatten().tolist()} == {
        "box0=removed", "box1=never", "box2=present"}
    pr = family_labels(_rows([COMPACT, "B0 x ; B1 ; B2 ; put y B1 . | B0"]), "prior")
    assert len(pr.examples) == 1 and pr.dropped == ("1:0 (numops 0)",)
    assert {pr.column_names[c] for c in pr.labels[0].nonzero().flatten().tolist()} == {"apple", "cup"}
    gl = family_labels(_rows([COMPACT]), "global")
    assert {gl.column_names[c] for c in gl.labels[0].nonzero().flatten().tolist()} == {
        "box0:bill", "box1:map", "box2:apple"}
    assert gl.examples[0].focus == (2,)


def test_rows_without_texts_are_refused() -> None:
    with pytest.raises(EntitylensError, match="rebuild it with `entitylens cache --overwrite`"):
        family_labels([{"row_id": "0", "state_id": "0:0"}], "global")
    with pytest.raises(EntitylensError, match="cache --roles @op_ends"):
        family_labels(_rows([COMPACT]), "incremental", roles=("last",), present={})
