"""The one-change edits of a K&S boxes state, per corruption kind, and the roles two prompts share.

Each edit (:class:`Edit`) is a corrupted version of a state's initial boxes and operations:
:func:`op_object_edits`, :func:`op_box_edits`, :func:`init_object_edits`, :func:`drop_op_edits`. Each
changes one variable of the task's causal model (named in :attr:`Edit.variable`). There is no order edit:
swapping two operations that are valid in both orders never changes a box's final contents (objects are
unique, contents are sets), so it is no counterfactual for the boxes answer.
:func:`alias_spans` locates what an edit changed in both prompts (the ``changed_object`` / ``changed_box``
roles) and :func:`shared_roles` keeps the catalogue roles present in both.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from entitylens.activations.roles import PromptStructure, role_span
from entitylens.patching.text_pair import Span
from entitylens.task.text import describe_operation
from entitylens.task.types import MAX_PER_BOX, Operation, sorted_contents
from entitylens.task.world import replay

__all__ = [
    "Edit",
    "alias_spans",
    "drop_op_edits",
    "init_object_edits",
    "op_box_edits",
    "op_object_edits",
    "shared_roles",
    "state_objects",
]


def state_objects(state: Any) -> set[str]:
    """Every object a state mentions (initial boxes and operations)."""
    objs = {o for box in state.initial for o in box}
    for op in state.operations:
        objs.update(op.objects)
    return objs


@dataclass
class Edit:
    """A corrupted version of a state: its initial boxes and operations, what changed (in words, and the variable)."""

    initial: Any
    ops: tuple[Any, ...]
    changed_op: int | None
    description: str
    variable: str = ""


def op_object_edits(state: Any, rng: random.Random, pool: Sequence[str]) -> list[Edit]:
    """``op_object``: the object(s) of one move/remove/put become other valid objects (same number)."""
    worlds = replay(state.initial, state.operations)
    used = state_objects(state)
    unused = [o for o in pool if o not in used]
    edits = []
    for i, op in enumerate(state.operations):
        if op.kind == "move_contents":
            continue
        if op.kind == "put":
            if len(unused) < len(op.objects):
                continue
            alts = [sorted_contents(rng.sample(unused, len(op.objects)))]
        else:
            before = worlds[i][op.box]
            alts = [c for c in itertools.combinations(before, len(op.objects)) if tuple(c) != op.objects]
        for alt in alts:
            new = Operation(op.kind, tuple(alt), op.box, op.dest)
            ops = state.operations[:i] + (new,) + state.operations[i + 1 :]
            edits.append(Edit(state.initial, ops, i, f"op {i} ({op.kind}): objects {list(op.objects)} -> {list(alt)}",
                              f"op{i}.object"))
    return edits


def op_box_edits(state: Any) -> list[Edit]:
    """``op_box``: the destination of one move (or the box of one put) becomes another box with room."""
    import dataclasses


    worlds = replay(state.initial, state.operations)
    n = len(state.initial)
    edits = []
    for i, op in enumerate(state.operations):
        before = worlds[i]
        if op.kind in ("move", "move_contents"):
            for b in range(n):
                if b in (op.box, op.dest) or len(before[b]) + len(op.objects) > MAX_PER_BOX:
                    continue
                new = dataclasses.replace(op, dest=b)
                ops = state.operations[:i] + (new,) + state.operations[i + 1 :]
                edits.append(Edit(state.initial, ops, i, f"op {i} ({op.kind}): destination box {op.dest} -> {b}",
                                  f"op{i}.box"))
        elif op.kind == "put":
            for b in range(n):
                if b == op.box or len(before[b]) + len(op.objects) > MAX_PER_BOX:
                    continue
                new = dataclasses.replace(op, box=b)
                ops = state.operations[:i] + (new,) + state.operations[i + 1 :]
                edits.append(Edit(state.initial, ops, i, f"op {i} (put): box {op.box} -> {b}", f"op{i}.box"))
    return edits


def init_object_edits(state: Any, rng: random.Random, pool: Sequence[str]) -> list[Edit]:
    """``init_object``: one initial object no operation touches becomes an object the state never mentions."""
    used = state_objects(state)
    touched = {o for op in state.operations for o in op.objects}
    unused = [o for o in pool if o not in used]
    edits = []
    for b, box in enumerate(state.initial):
        for old in box:
            if old in touched or not unused:
                continue
            new = rng.choice(unused)
            initial = tuple(
                sorted_contents([new if o == old else o for o in c]) if k == b else c
                for k, c in enumerate(state.initial)
            )
            edits.append(Edit(initial, state.operations, None, f"initial box {b}: {old} -> {new}", f"initial.box{b}"))
    return edits


def drop_op_edits(state: Any) -> list[Edit]:
    """``drop_op``: one operation is removed."""
    edits = []
    for i, op in enumerate(state.operations):
        ops = state.operations[:i] + state.operations[i + 1 :]
        edits.append(Edit(state.initial, ops, i, f"dropped op {i}: {describe_operation(op, state.variant)}",
                          f"op{i}.present"))
    return edits


def _first_diff(a: Sequence[Any], b: Sequence[Any]) -> int | None:
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return k
    return None


def alias_spans(
    kind: str,
    clean: PromptStructure,
    corr: PromptStructure,
    clean_text: str,
    corr_text: str,
    edit: Edit,
    state: Any,
) -> dict[str, tuple[Span, Span]]:
    """The alias roles of an edit: ``changed_object`` / ``changed_box`` as (clean, corrupted) character spans."""
    i = edit.changed_op
    if kind == "op_object" and i is not None:
        co, xo = clean.operations[i].objects, corr.operations[i].objects
        k = _first_diff([clean_text[s:e] for s, e in co], [corr_text[s:e] for s, e in xo])
        return {} if k is None else {"changed_object": (co[k], xo[k])}
    if kind == "op_box" and i is not None:
        op = state.operations[i]
        if op.kind in ("move", "move_contents"):
            cs, xs = clean.operations[i].dest, corr.operations[i].dest
        else:
            cs, xs = clean.operations[i].box, corr.operations[i].box
        return {} if cs is None or xs is None else {"changed_box": (cs, xs)}
    if kind == "init_object":
        old = set(clean.desc_objects) - set(corr.desc_objects)
        new = set(corr.desc_objects) - set(clean.desc_objects)
        if len(old) == 1 and len(new) == 1:
            return {"changed_object": (clean.desc_objects[old.pop()], corr.desc_objects[new.pop()])}
    return {}


def shared_roles(
    clean: str, corr: str, cs: PromptStructure, xs: PromptStructure, candidates: Sequence[str]
) -> list[str]:
    """The ``candidates`` present in both prompts (``last`` always), in order."""
    out = []
    for role in candidates:
        if role == "last" or (
            role_span(cs, role, len(clean)) is not None and role_span(xs, role, len(corr)) is not None
        ):
            out.append(role)
    return out
