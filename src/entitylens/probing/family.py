"""The probe family of the boxes-task studies (Tang et al., ICML 2026), labelled from each prompt's replay.

The targets: global, prior-state, mention, incremental and ternary tags.

Every label comes from :func:`entitylens.probing.world.prompt_world` -- the prompt text parsed and its
operations replayed by the task's world simulator -- so it is right for K&S sentences, AltForms and the
compact form alike, and needs nothing but the prompt text a cache stores in ``rows.json``.

=================== ================================= ===================================================
target              features at                       label
=================== ================================= ===================================================
``global``          the run's roles (e.g. ``last``)   every box's contents at the end: one binary column
                                                      per (box, object); reported per box and split into
                                                      the queried box and the others
``prior``           the run's roles                   the queried box's contents *before* the last
                                                      operation that changed it (rows with numops >= 1)
``mention``         every box mention (``@mentions``) that box's contents as of that point of the text:
                                                      the description's contents at ``box{k}_desc``, the
                                                      state after operation ``i`` at ``op{i}_box`` /
                                                      ``op{i}_dest`` (Tang et al.'s convention)
``incremental``     every operation's end             the whole state after that operation (box, object);
                    (``@op_ends``)                    split into the boxes it changed and the others
``tags_box``        every box mention (``@mentions``) for each object named so far, that box's tag:
                                                      never / present / removed (conditioned on the box)
``tags_object``     every object mention              for each box, that object's tag there
                    (``@objects``)                    (conditioned on the object)
=================== ================================= ===================================================

Context targets (mention, incremental, tags) take one example per (state, position): the context before
the query is the same for every queried box of a state, so only the first cached row of each state is used.
The description's box label comes *before* its contents in the K&S and compact forms (``Box 0 contains the
apple``): at ``box{k}_desc`` the contents are not yet in the text, and a probe cannot be expected to read
them there -- the ``exact_match_kind=desc`` row shows it; AltForms names the contents first.

A ternary tag is fitted one-vs-rest (three logistic columns per (box, object), each exactly scikit-learn's
``LogisticRegression``) and predicted as the class with the largest logit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from entitylens.errors import EntitylensError
from entitylens.probing.world import TAG_CLASSES, PromptWorld, box_index, prompt_world

__all__ = ["CONTEXT_TARGETS", "FAMILY_TARGETS", "Example", "FamilyLabels", "family_labels", "multi_hot"]

ROLE_TARGETS_FAMILY = ("global", "prior")
CONTEXT_TARGETS: dict[str, str] = {
    "mention": "@mentions",
    "incremental": "@op_ends",
    "tags_box": "@mentions",
    "tags_object": "@objects",
}
"""Context targets and the role group whose positions they probe (cache with that group)."""
FAMILY_TARGETS = (*ROLE_TARGETS_FAMILY, *CONTEXT_TARGETS)
"""Targets built here (besides ``box_contents`` and ``object_in_box``)."""

_MENTION_RE = re.compile(r"box(?P<label>\d+|[A-Z])_desc|op(?P<i>\d+)_(?P<part>box|dest)")
_END_RE = re.compile(r"op(?P<i>\d+)_end")
_OBJECT_RE = re.compile(r"box(?P<label>\d+|[A-Z])_object(?P<j>\d+)|op(?P<i>\d+)_object(?P<oj>\d+)")


@dataclass(frozen=True)
class Example:
    """One probe example: a cache row, the role its features come from, and what it is about.

    Attributes:
        row: Cache row index.
        role: Role of the features (``""``: the run's roles).
        upto: Operations read at the position (0 = the description).
        box: The box the example is about (queried, mentioned or the operation's box; -1: none).
        obj: The object the example is about (``tags_object``; ``""`` otherwise).
        kind: The position's kind (``desc``, ``move_source``, ``move_dest``, ``put``, ``remove``,
            ``move_contents_source`` ...), or ``""``.
        focus: Boxes the split metrics single out (the queried box, or the boxes the operation changed).
    """

    row: int
    role: str
    upto: int
    box: int
    obj: str = ""
    kind: str = ""
    focus: tuple[int, ...] = ()


@dataclass(frozen=True)
class FamilyLabels:
    """Labels of a family target, one row per example (what :func:`entitylens.probing.targets.build_target` wraps).

    Attributes:
        examples: The examples.
        labels: ``[n, column]`` binary labels (tags: three one-vs-rest columns per (box, object)).
        column_names: One name per column (``"box3:apple"``, ``"apple"``, ``"box3:apple=removed"``).
        column_objects: The object of each column.
        column_boxes: The box of each column (-1 when columns are not per box).
        column_groups: Tags only: the (box, object) entry of each column (three columns per entry, in
            :data:`~entitylens.probing.world.TAG_CLASSES` order); empty otherwise.
        scored: Tags only: ``[n, entry]`` which entries are scored (objects named so far); else ``None``.
        numops: Per example, operations so far that changed the example's box (-1: not meaningful).
        types: Per example, the control-task type (the initial contents of the example's box).
        strata: Extra per-example strata reported as ``exact_match_<name>=<value>``.
        dropped: Rows or states left out, with why (``"3:2 (numops 0)"``).
    """

    examples: tuple[Example, ...]
    labels: Tensor
    column_names: tuple[str, ...]
    column_objects: tuple[str, ...]
    column_boxes: tuple[int, ...]
    column_groups: tuple[int, ...] = ()
    scored: Tensor | None = None
    numops: tuple[int, ...] = ()
    types: tuple[str, ...] = ()
    strata: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    dropped: tuple[str, ...] = ()


def _texts(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    texts = [r.get("text") for r in rows]
    if any(not isinstance(t, str) for t in texts):
        raise EntitylensError("this cache's rows.json has no prompt texts (written by an older entitylens); "
                              "rebuild it with `entitylens cache --overwrite` to probe the family targets")
    return [str(t) for t in texts]


def _first_row_per_state(rows: Sequence[Mapping[str, Any]]) -> list[int]:
    """Index of the first row of every state (context positions are the same for every queried box)."""
    seen: set[str] = set()
    out = []
    for i, r in enumerate(rows):
        key = str(r.get("state_id", r.get("sample_id", i)))
        if key not in seen:
            seen.add(key)
            out.append(i)
    return out


def _kind_of(world: PromptWorld, i: int, part: str) -> str:
    op = world.operations[i]
    if op.kind in ("move", "move_contents"):
        return f"{op.kind}_{'source' if part == 'box' else 'dest'}"
    return op.kind


def _role_examples(target: str, worlds: Sequence[PromptWorld], rows: Sequence[Mapping[str, Any]]
                   ) -> tuple[list[Example], list[str]]:
    """Examples of ``global`` / ``prior``: one per row (``prior``: rows whose queried box an operation changed)."""
    examples, dropped = [], []
    for i, w in enumerate(worlds):
        if w.query_box is None:
            raise EntitylensError(f"row {rows[i].get('row_id', i)} has no 'Box N contains' query; cache boxes rows")
        if target == "prior" and w.prior(w.query_box) is None:
            dropped.append(f"{rows[i].get('row_id', i)} (numops 0)")
            continue
        examples.append(Example(row=i, role="", upto=len(w.operations), box=w.query_box, focus=(w.query_box,)))
    return examples, dropped


def _context_examples(target: str, worlds: Sequence[PromptWorld], roles: Sequence[str],
                      present: Mapping[str, Tensor], first_rows: Sequence[int]) -> list[Example]:
    """Examples of the context targets: (first row of a state, cached role of the target's group) pairs."""
    examples = []
    for row in first_rows:
        w = worlds[row]
        for role in roles:
            if not bool(present[role][row]):
                continue
            if target in ("mention", "tags_box") and (m := _MENTION_RE.fullmatch(role)):
                if m.group("label") is not None:
                    examples.append(Example(row, role, 0, box_index(m.group("label")), kind="desc"))
                else:
                    i, part = int(m.group("i")), m.group("part")
                    op = w.operations[i]
                    box = op.box if part == "box" else op.dest
                    assert box is not None
                    examples.append(Example(row, role, i + 1, box, kind=_kind_of(w, i, part)))
            elif target == "incremental" and (m := _END_RE.fullmatch(role)):
                i = int(m.group("i"))
                op = w.operations[i]
                examples.append(Example(row, role, i + 1, op.box, kind=op.kind, focus=op.boxes))
            elif target == "tags_object" and (m := _OBJECT_RE.fullmatch(role)):
                s = w.structure
                if m.group("label") is not None:
                    name = s.desc_contents[m.group("label")][int(m.group("j"))][0]
                    examples.append(Example(row, role, 0, box_index(m.group("label")), obj=name, kind="desc"))
                else:
                    i = int(m.group("i"))
                    name = s.operations[i].object_names[int(m.group("oj"))]
                    op = w.operations[i]
                    examples.append(Example(row, role, i + 1, op.box, obj=name, kind=op.kind))
    return examples


def multi_hot(entries: Sequence[Mapping[Any, bool]], min_count: int) -> tuple[Tensor, list[Any]]:
    """Binary labels from per-example ``{key: True}`` sets: one column per key true in >= ``min_count`` examples."""
    counts: dict[Any, int] = {}
    for e in entries:
        for k in e:
            counts[k] = counts.get(k, 0) + 1
    keys = sorted(k for k, c in counts.items() if c >= min_count)
    col = {k: j for j, k in enumerate(keys)}
    labels = torch.zeros(len(entries), len(keys), dtype=torch.bool)
    for r, e in enumerate(entries):
        for k in e:
            if k in col:
                labels[r, col[k]] = True
    return labels, keys


def _tags(examples: Sequence[Example], worlds: Sequence[PromptWorld], by_object: bool
          ) -> tuple[Tensor, list[tuple[int, str]], Tensor]:
    """Ternary tags: ``[n, entry * 3]`` one-vs-rest labels, the (box, object) entries, ``[n, entry]`` scored."""
    per_example: list[dict[tuple[int, str], int]] = []
    for ex in examples:
        tags = worlds[ex.row].tags(ex.upto)
        if by_object:
            per_example.append({k: v for k, v in tags.items() if k[1] == ex.obj})
        else:
            per_example.append({k: v for k, v in tags.items() if k[0] == ex.box})
    if by_object:
        num_boxes = max(w.num_boxes for w in worlds)
        entries = [(b, "") for b in range(num_boxes)]
        key = [{(b, ""): v for (b, _), v in t.items()} for t in per_example]
    else:
        objects = sorted({o for t in per_example for (_, o) in t})
        entries = [(-1, o) for o in objects]
        key = [{(-1, o): v for (_, o), v in t.items()} for t in per_example]
    labels = torch.zeros(len(examples), len(entries) * 3, dtype=torch.bool)
    scored = torch.zeros(len(examples), len(entries), dtype=torch.bool)
    for r, t in enumerate(key):
        for e, entry in enumerate(entries):
            cls = t.get(entry)
            scored[r, e] = cls is not None
            labels[r, e * 3 + (0 if cls is None else cls)] = True  # an object not named yet: never there
    return labels, entries, scored


def family_labels(rows: Sequence[Mapping[str, Any]], target: str, *, roles: Sequence[str] = (),
                  present: Mapping[str, Tensor] | None = None, min_count: int = 1) -> FamilyLabels:
    """Build the examples and labels of a family target from cache rows (their prompt texts).

    Args:
        rows: One metadata dict per cache row, each with its prompt ``text``.
        target: One of :data:`FAMILY_TARGETS`.
        roles: The cache's roles (context targets use those of their group).
        present: Role -> ``[rows]`` presence mask (context targets).
        min_count: Keep binary columns true in at least this many examples (not tags: every entry is kept).

    Returns:
        The :class:`FamilyLabels`.

    Raises:
        EntitylensError: Unknown target, rows without texts, a context target whose positions the cache
            lacks, or no example / label left.
    """
    if target not in FAMILY_TARGETS:
        raise EntitylensError(f"unknown family target {target!r}; use one of {', '.join(FAMILY_TARGETS)}")
    texts = _texts(rows)
    worlds = [prompt_world(t) for t in texts]
    dropped: list[str] = []
    if target in ROLE_TARGETS_FAMILY:
        examples, dropped = _role_examples(target, worlds, rows)
    else:
        group = CONTEXT_TARGETS[target]
        if present is None or not any(_fits(target, r) for r in roles):
            raise EntitylensError(f"the cache has no {group} positions for target {target!r}; cache with "
                                  f"`entitylens cache --roles {group}` (add query roles as needed)")
        examples = _context_examples(target, worlds, [r for r in roles if _fits(target, r)], present,
                                     _first_row_per_state(rows))
    if not examples:
        raise EntitylensError(f"no example for target {target!r} in this cache (e.g. prior needs rows whose "
                              "queried box an operation changed); cache more states")
    types = tuple("+".join(worlds[e.row].initial[e.box]) if e.box >= 0 else "" for e in examples)
    numops = tuple(worlds[e.row].numops(e.box, e.upto) if target not in ("incremental", "global") else -1
                   for e in examples)
    strata: dict[str, tuple[str, ...]] = {}
    if target in CONTEXT_TARGETS:
        strata["kind"] = tuple(e.kind for e in examples)
        strata["ops"] = tuple(str(e.upto) for e in examples)
    if target in ("global", "incremental"):
        if target == "global":
            strata["ops"] = tuple(str(e.upto) for e in examples)
        sets: list[dict[Any, bool]] = [
            {(b, o): True for b, contents in enumerate(worlds[e.row].states[e.upto]) for o in contents}
            for e in examples]
        labels, keys = multi_hot(sets, min_count)
        return FamilyLabels(examples=tuple(examples), labels=labels,
                            column_names=tuple(f"box{b}:{o}" for b, o in keys),
                            column_objects=tuple(o for _, o in keys), column_boxes=tuple(b for b, _ in keys),
                            numops=numops, types=types, strata=strata, dropped=tuple(dropped))
    if target in ("prior", "mention"):
        sets = []  # type: ignore[var-annotated]  # redefined: one object per key here
        for e in examples:
            w = worlds[e.row]
            state = w.prior(e.box) if target == "prior" else w.states[e.upto]
            assert state is not None
            sets.append({o: True for o in state[e.box]})
        labels, keys = multi_hot(sets, min_count)
        return FamilyLabels(examples=tuple(examples), labels=labels, column_names=tuple(keys),
                            column_objects=tuple(keys), column_boxes=(-1,) * len(keys), numops=numops,
                            types=types, strata=strata, dropped=tuple(dropped))
    by_object = target == "tags_object"
    labels, entries, scored = _tags(examples, worlds, by_object)
    names = tuple(f"box{b}={c}" if by_object else f"{o}={c}" for b, o in entries for c in TAG_CLASSES)
    return FamilyLabels(examples=tuple(examples), labels=labels, column_names=names,
                        column_objects=tuple(o for _, o in entries for _ in TAG_CLASSES),
                        column_boxes=tuple(b for b, _ in entries for _ in TAG_CLASSES),
                        column_groups=tuple(e for e in range(len(entries)) for _ in TAG_CLASSES), scored=scored,
                        numops=numops, types=types, strata=strata, dropped=tuple(dropped))


def _fits(target: str, role: str) -> bool:
    """Whether ``role`` is a position of the context target ``target``."""
    pattern = {"mention": _MENTION_RE, "tags_box": _MENTION_RE, "incremental": _END_RE, "tags_object": _OBJECT_RE}
    return pattern[target].fullmatch(role) is not None
