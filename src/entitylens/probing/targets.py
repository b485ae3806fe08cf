"""Probe targets built from an activation cache's row metadata.

A cache (:func:`entitylens.activations.load_cache`) stores one metadata dict per row (one prompt = one
state queried at one box): ``state_id``, ``box``, ``numops``, ``gold`` (the queried box's contents) and
``objects`` (every object mentioned in the state). From these:

* ``box_contents`` (issue target b): the queried box's object set, multi-label, one binary column per
  object of the vocabulary (objects in the gold contents of at least ``min_count`` rows);
* ``object_in_box`` (issue target a): "is object *o* in box *b*" for every box of the state, one binary
  column per (box, object) pair that is true in at least ``min_count`` rows. The contents of the other
  boxes come from the state's other rows; states not cached at every box are left out.

Every target also carries the groups (state ids) and the scenarios (``sample_id``: states that are
prefixes of one scenario share their initial description and all but their last operations, so a probe
could look answers up from sibling states; the probe run splits by scenario by default), numops per row
(for numops-stratified accuracy, target c), the number of operations of each row's state, the control-task
type of each row and the objects each row's labels involve (for disjoint-object splits).

The control-task *type* of a row is its **object type**: the object(s) the queried box holds in the
state's initial description (``"bottle"``, ``"apple+bottle"``, or ``""`` for an empty box). A Hewitt &
Liang (2019) control task gives every type one random label set (:func:`entitylens.probing.controls.control_labels`),
so a probe can only solve it by memorising object identity; ``selectivity = task - control`` is what the
probe gets beyond that. (Typing rows by the queried box instead would make the control trivially easy --
the box number is the token under the ``query_box`` role -- and selectivity negative everywhere.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from entitylens.errors import EntitylensError
from entitylens.probing.family import CONTEXT_TARGETS, FAMILY_TARGETS, FamilyLabels, family_labels, multi_hot

TARGETS = ("box_contents", "object_in_box", *FAMILY_TARGETS)
"""Target names accepted by :func:`build_target` (the family targets: :mod:`entitylens.probing.family`)."""

__all__ = ["TARGETS", "ProbeTarget", "build_target"]


@dataclass(frozen=True)
class ProbeTarget:
    """Labels and per-row side information for probing one target.

    Attributes:
        name: ``"box_contents"`` or ``"object_in_box"``.
        rows: ``[n]`` indices of the cache rows used (all rows unless states were incomplete).
        labels: ``[n, target]`` binary labels.
        target_names: One name per label column (``"bottle"`` or ``"box3:bottle"``).
        groups: ``[n]`` state id per row.
        scenarios: ``[n]`` scenario (``sample_id``) per row -- the default split key; the state id where a
            row has no ``sample_id``.
        boxes: ``[n]`` queried box per row.
        prefix_ops: ``[n]`` operations in each row's state (``-1`` when unknown).
        numops: ``[n]`` numops of the queried box per row (``-1`` where the cache has none).
        types: ``[n]`` control-task type code per row: the queried box's initial contents, an index into
            ``type_names`` (``-1`` for every row of a cache without ``initial`` metadata).
        vocabulary: Objects indexing the columns of ``objects``.
        objects: ``[n, len(vocabulary)]`` objects each row's labels involve (the queried box's contents
            for ``box_contents``; every box's contents for ``object_in_box``), for disjoint-object splits.
        column_objects: The object of each label column.
        dropped_states: States left out (``object_in_box`` only: not cached at every box).
        type_names: Name of each control-task type (objects joined by ``+``; ``""`` = empty box).
        example_roles: Context targets: the role each example's features come from; empty: the run's roles.
        column_boxes: The box of each label column (-1 / empty: columns are not per box).
        column_groups: Ternary tags: the (box, object) entry of each column, three one-vs-rest columns per
            entry decided by the largest logit; empty otherwise.
        scored: Ternary tags: ``[n, entry]`` entries that are scored (objects named so far).
        focus: Per example, the boxes split metrics single out (``global``: the queried box;
            ``incremental``: the boxes the operation changed).
        strata: Extra per-example strata, reported as ``exact_match_<name>=<value>``.
    """

    name: str
    rows: Int[Tensor, " n"]
    labels: Bool[Tensor, "n target"]
    target_names: tuple[str, ...]
    groups: tuple[str, ...]
    numops: Int[Tensor, " n"]
    types: Int[Tensor, " n"]
    vocabulary: tuple[str, ...]
    objects: Bool[Tensor, "n num_objects"]
    column_objects: tuple[str, ...] = ()
    dropped_states: tuple[str, ...] = ()
    type_names: tuple[str, ...] = ()
    scenarios: tuple[str, ...] = ()
    boxes: tuple[str, ...] = ()
    prefix_ops: tuple[int, ...] = ()
    example_roles: tuple[str, ...] = ()
    column_boxes: tuple[int, ...] = ()
    column_groups: tuple[int, ...] = ()
    scored: Bool[Tensor, "n entry"] | None = None
    focus: tuple[tuple[int, ...], ...] = ()
    strata: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def is_context(self) -> bool:
        """Whether the examples' features come from their own roles (context targets), not the run's roles."""
        return bool(self.example_roles)

    def __post_init__(self) -> None:
        n = len(self.rows)
        if not self.scenarios:
            object.__setattr__(self, "scenarios", tuple(self.groups))
        if not self.boxes:
            object.__setattr__(self, "boxes", ("",) * n)
        if not self.prefix_ops:
            object.__setattr__(self, "prefix_ops", (-1,) * n)
        if self.labels.shape[0] != n or len(self.groups) != n or len(self.numops) != n or len(self.types) != n:
            raise EntitylensError("ProbeTarget fields must have one entry per row; build it with build_target")
        if self.labels.shape[1] != len(self.target_names):
            raise EntitylensError("ProbeTarget needs one target name per label column; build it with build_target")


def _group(row: Mapping[str, Any], i: int) -> str:
    for key in ("state_id", "sample_id"):
        if row.get(key) is not None:
            return str(row[key])
    raise EntitylensError(f"cache row {i} has no state_id or sample_id; cache States/BoxRows so rows carry them")


def _scenario(row: Mapping[str, Any], i: int) -> str:
    """The row's scenario (``sample_id``; its state where it has none): the default split unit."""
    sid = row.get("sample_id")
    return str(sid) if sid is not None else _group(row, i)


def _need(row: Mapping[str, Any], key: str, i: int) -> Any:
    if row.get(key) is None:
        raise EntitylensError(f"cache row {i} has no {key!r} metadata; cache States or BoxRows (not plain strings)")
    return row[key]


def _box_contents(golds: Sequence[tuple[str, ...]], min_count: int
                  ) -> tuple[Tensor, tuple[str, ...], tuple[str, ...]]:
    """``box_contents`` labels: one column per object in the gold contents of at least ``min_count`` rows.

    Returns:
        The ``[n, target]`` labels, the column names and the object of each column.
    """
    labels, names = multi_hot([dict.fromkeys(g, True) for g in golds], min_count)
    return labels, tuple(names), tuple(names)


def _contents_by_state(groups: Sequence[str], boxes: Sequence[int], golds: Sequence[tuple[str, ...]]
                       ) -> dict[str, dict[int, tuple[str, ...]]]:
    """The gold contents of every cached box of every state (two rows of one box must agree)."""
    by_state: dict[str, dict[int, tuple[str, ...]]] = {}
    for g, b, gold in zip(groups, boxes, golds, strict=True):
        seen = by_state.setdefault(g, {})
        if b in seen and seen[b] != gold:
            raise EntitylensError(f"state {g} has two rows for box {b} with different gold contents; "
                                  "give every prefix its own state id")
        seen[b] = gold
    return by_state


def _object_in_box(groups: Sequence[str], keep: Sequence[int], by_state: Mapping[str, Mapping[int, tuple[str, ...]]],
                   min_count: int) -> tuple[Tensor, tuple[str, ...], tuple[str, ...]]:
    """``object_in_box`` labels of the rows ``keep``: one column per (box, object) true in ``min_count`` rows.

    Returns:
        The ``[len(keep), target]`` labels, the column names (``"box3:bottle"``) and the object of each column.
    """
    pair_counts: dict[tuple[int, str], int] = {}
    for i in keep:
        for b, gold in by_state[groups[i]].items():
            for o in set(gold):
                pair_counts[(b, o)] = pair_counts.get((b, o), 0) + 1
    pairs = sorted(p for p, c in pair_counts.items() if c >= min_count)
    col2 = {p: j for j, p in enumerate(pairs)}
    labels = torch.zeros(len(keep), len(pairs), dtype=torch.bool)
    for r, i in enumerate(keep):
        for b, gold in by_state[groups[i]].items():
            for o in gold:
                if (b, o) in col2:
                    labels[r, col2[(b, o)]] = True
    return labels, tuple(f"box{b}:{o}" for b, o in pairs), tuple(o for _, o in pairs)


def _mentioned_objects(mentioned: Sequence[set[str]]) -> tuple[tuple[str, ...], Tensor]:
    """The vocabulary of the objects the rows' labels involve, and the ``[n, len(vocabulary)]`` indicator."""
    vocabulary = tuple(sorted(set().union(*mentioned)))
    vcol = {o: j for j, o in enumerate(vocabulary)}
    objects = torch.zeros(len(mentioned), len(vocabulary), dtype=torch.bool)
    for r, objs in enumerate(mentioned):
        for o in objs:
            objects[r, vcol[o]] = True
    return vocabulary, objects


def _control_types(meta_rows: Sequence[Mapping[str, Any]], keep: Sequence[int]) -> tuple[tuple[str, ...], Tensor]:
    """Control-task type names and the type code of each kept row: the queried box's initial contents.

    Every code is -1 (and there are no names) for a cache written before rows carried their initial contents.
    """
    if all(meta_rows[i].get("initial") is not None for i in keep):
        type_of = ["+".join(sorted(str(o) for o in meta_rows[i]["initial"])) for i in keep]
        type_names = tuple(sorted(set(type_of)))
        tcode = {t: j for j, t in enumerate(type_names)}
        return type_names, torch.tensor([tcode[t] for t in type_of], dtype=torch.int64)
    return (), torch.full((len(keep),), -1, dtype=torch.int64)


def build_target(
    rows: Sequence[Mapping[str, Any]] | Any,
    target: str = "box_contents",
    *,
    min_count: int = 1,
) -> ProbeTarget:
    """Build probe labels from cache row metadata.

    Args:
        rows: A :class:`~entitylens.activations.CachedActivations` or its ``rows`` (one metadata dict per
            cached row; the context targets need the cache itself, for its roles).
        target: ``"box_contents"`` (queried box's object set), ``"object_in_box"`` (every box x object) or a
            family target (:data:`~entitylens.probing.family.FAMILY_TARGETS`).
        min_count: Keep only label columns that are true in at least this many rows.

    Returns:
        The :class:`ProbeTarget`.

    Raises:
        EntitylensError: Unknown target, rows without the needed metadata, or no label left.
    """
    if target not in TARGETS:
        raise EntitylensError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}")
    if int(min_count) < 1:
        raise EntitylensError(f"min_count must be >= 1, got {min_count}; use e.g. 1")
    meta_rows = list(getattr(rows, "rows", rows))
    if not meta_rows:
        raise EntitylensError("the cache has no rows; build a cache with `entitylens cache` first")
    if target in FAMILY_TARGETS:
        return _family_target(rows, meta_rows, target, min_count)
    groups = [_group(r, i) for i, r in enumerate(meta_rows)]
    boxes = [int(_need(r, "box", i)) for i, r in enumerate(meta_rows)]
    golds = [tuple(str(o) for o in _need(r, "gold", i)) for i, r in enumerate(meta_rows)]
    keep = list(range(len(meta_rows)))
    dropped: tuple[str, ...] = ()
    if target == "box_contents":
        labels, target_names, column_objects = _box_contents(golds, min_count)
        mentioned = [set(golds[i]) for i in keep]
    else:
        num_boxes = max(boxes) + 1
        by_state = _contents_by_state(groups, boxes, golds)
        complete = {g for g, s in by_state.items() if len(s) == num_boxes}
        dropped = tuple(sorted(set(by_state) - complete))
        keep = [i for i, g in enumerate(groups) if g in complete]
        if not keep:
            raise EntitylensError(f"no state is cached at all {num_boxes} boxes; cache whole States (every box) "
                                  "for object_in_box, or use --target box_contents")
        labels, target_names, column_objects = _object_in_box(groups, keep, by_state, min_count)
        mentioned = [set().union(*by_state[groups[i]].values()) for i in keep]
    if labels.shape[1] == 0:
        raise EntitylensError(f"no {target} label is true in >= {min_count} rows; lower --min-count or cache more "
                              "states")
    vocabulary, objects = _mentioned_objects(mentioned)
    numops = torch.tensor([int(meta_rows[i].get("numops", -1) if meta_rows[i].get("numops") is not None else -1)
                           for i in keep], dtype=torch.int64)
    type_names, types = _control_types(meta_rows, keep)

    return ProbeTarget(
        scenarios=tuple(_scenario(meta_rows[i], i) for i in keep),
        boxes=tuple(str(meta_rows[i].get("box")) for i in keep),
        prefix_ops=tuple(-1 if meta_rows[i].get("num_operations") is None else int(meta_rows[i]["num_operations"])
                         for i in keep),
        name=target,
        rows=torch.tensor(keep, dtype=torch.int64),
        labels=labels,
        target_names=target_names,
        groups=tuple(groups[i] for i in keep),
        numops=numops,
        types=types,
        vocabulary=vocabulary,
        objects=objects,
        column_objects=column_objects,
        dropped_states=dropped,
        type_names=type_names,
    )


def _family_target(cache: Any, meta_rows: Sequence[Mapping[str, Any]], target: str, min_count: int) -> ProbeTarget:
    """A family target (:mod:`entitylens.probing.family`) as a :class:`ProbeTarget`."""
    roles: tuple[str, ...] = ()
    present = None
    if target in CONTEXT_TARGETS:
        if not hasattr(cache, "present"):
            raise EntitylensError(f"target {target!r} needs the cache itself (its roles), not only its rows; "
                                  "pass the CachedActivations")
        roles = tuple(cache.roles)
        present = _LazyPresence(cache)
    fam: FamilyLabels = family_labels(meta_rows, target, roles=roles, present=present, min_count=min_count)
    if fam.labels.shape[1] == 0:
        raise EntitylensError(f"no {target} label is true in >= {min_count} examples; lower --min-count or cache "
                              "more states")
    keep = [e.row for e in fam.examples]
    groups = [_group(meta_rows[i], i) for i in keep]
    mentioned = [set(fam.column_objects[j] for j in fam.labels[r].nonzero().flatten().tolist()) - {""}
                 for r in range(len(keep))]
    vocabulary, objects = _mentioned_objects(mentioned)
    type_names = tuple(sorted(set(fam.types)))
    tcode = {t: j for j, t in enumerate(type_names)}

    return ProbeTarget(
        name=target,
        rows=torch.tensor(keep, dtype=torch.int64),
        labels=fam.labels,
        target_names=fam.column_names,
        groups=tuple(groups),
        numops=torch.tensor(fam.numops, dtype=torch.int64),
        types=torch.tensor([tcode[t] for t in fam.types], dtype=torch.int64),
        vocabulary=vocabulary,
        objects=objects,
        column_objects=fam.column_objects,
        dropped_states=fam.dropped,
        type_names=type_names,
        scenarios=tuple(_scenario(meta_rows[i], i) for i in keep),
        boxes=tuple(str(e.box) for e in fam.examples),
        prefix_ops=tuple(e.upto for e in fam.examples),
        example_roles=tuple(e.role for e in fam.examples) if target in CONTEXT_TARGETS else (),
        column_boxes=fam.column_boxes,
        column_groups=fam.column_groups,
        scored=fam.scored,
        focus=tuple(e.focus for e in fam.examples),
        strata=dict(fam.strata),
    )


class _LazyPresence(Mapping[str, Tensor]):
    """Role -> presence mask of a cache, read on first use (a context target reads only its group's roles)."""

    def __init__(self, cache: Any) -> None:
        self._cache = cache
        self._seen: dict[str, Tensor] = {}

    def __getitem__(self, role: str) -> Tensor:
        if role not in self._seen:
            self._seen[role] = self._cache.present(role)
        return self._seen[role]

    def __iter__(self) -> Any:
        return iter(self._cache.roles)

    def __len__(self) -> int:
        return len(self._cache.roles)
