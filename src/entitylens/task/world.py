"""The boxes-task world: applying operations, sampling scenarios, counting ``numops``.

This is a deterministic re-implementation of the world simulator in Kim & Schuster (2023)'s
``generate_boxes_data.py`` (sebschu/entity-tracking-lms), with the sampling rules unchanged:

* Initial state: the number of objects per box is drawn i.i.d. Poisson(``expected_per_box``) (2 in the
  paper) for every box, the whole draw is repeated while its (uncapped) sum exceeds the vocabulary, and
  each count is then capped at ``max_per_box`` (3). Box by box, that many objects are drawn without
  replacement from the objects not yet in a box.
* Each of the ``num_operations`` operations draws an operation type uniformly from move / remove / put and
  a box uniformly; a draw that is invalid is discarded and *both* are drawn again:

  - move: the box must be non-empty; the destination is uniform over the other boxes; a non-empty
    random subset of the box (one fair coin per object, redrawn until non-empty) moves; the draw is
    invalid when the destination would exceed ``max_per_box``.
  - put: ``Poisson(max(1, int(expected_per_box / 2)))`` new objects (drawn without replacement from the
    objects in no box); invalid when that number is 0 or the box would exceed ``max_per_box``.
  - remove: the box must be non-empty; a non-empty random subset (as for move) leaves the box.

* ``numops`` of a box after a prefix = the number of operations in the prefix that changed the box (a move
  changes two boxes), ``numops_by_op`` the same split by operation type (``move_contents`` counts as
  ``move``).

Differences from the original, all for reproducibility: one private :class:`random.Random` per scenario
(seeded from the string ``"entitylens-boxes:<seed>:<index>"``, so scenario ``i`` of a seed never depends on
how many other scenarios are drawn), Poisson variates by Knuth's multiplication method on that generator,
and every set is iterated in sorted / vocabulary order. No global RNG state is touched and nothing depends
on ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from entitylens.errors import EntitylensError
from entitylens.task.types import MAX_PER_BOX, NUM_BOXES, OP_KINDS, Contents, Operation, sorted_contents

Boxes = tuple[Contents, ...]
"""Contents of every box, indexed by box number."""

_SAMPLED_KINDS: tuple[str, ...] = ("move", "remove", "put")  # K&S order of ``_OPERATIONS_DICT``


def poisson(rng: random.Random, lam: float) -> int:
    """Draw a Poisson(``lam``) variate with Knuth's method (exact; fine for the small means used here).

    Args:
        rng: The generator to draw uniforms from.
        lam: The mean (``>= 0``).

    Returns:
        A non-negative integer.

    """
    if lam < 0 or not math.isfinite(lam):
        raise EntitylensError(f"Poisson mean must be a finite number >= 0, got {lam}; pass a valid mean")
    limit = math.exp(-lam)
    k = 0
    p = rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def scenario_rng(seed: int, index: int) -> random.Random:
    """Return scenario ``index``'s private generator for ``seed`` (independent of other scenarios)."""
    return random.Random(f"entitylens-boxes:{int(seed)}:{int(index)}")


def _box_range_error(box: int, num_boxes: int, what: str) -> EntitylensError:
    return EntitylensError(
        f"{what} names box {box} but there are {num_boxes} boxes (0-{num_boxes - 1}); use a box index in range"
    )


def validate_boxes(boxes: Sequence[Sequence[str]], max_per_box: int = MAX_PER_BOX) -> Boxes:
    """Check a world state and return it as sorted tuples.

    Args:
        boxes: Contents of every box.
        max_per_box: Capacity of a box.

    Returns:
        The same contents as a tuple of alphabetically sorted tuples.

    Raises:
        EntitylensError: If a box holds more than ``max_per_box`` objects or an object is in two boxes.

    """
    seen: dict[str, int] = {}
    out = []
    for i, b in enumerate(boxes):
        c = sorted_contents(b)
        if len(c) > max_per_box:
            raise EntitylensError(
                f"box {i} holds {len(c)} objects, more than the capacity {max_per_box}; remove objects"
            )
        for o in c:
            if o in seen:
                raise EntitylensError(f"object {o!r} is in box {seen[o]} and box {i}; put each object in one box")
            seen[o] = i
        out.append(c)
    return tuple(out)


def apply_operation(boxes: Boxes, op: Operation, max_per_box: int = MAX_PER_BOX) -> Boxes:
    """Apply one operation to a world state (pure: returns a new state).

    Args:
        boxes: Contents of every box before the operation (sorted tuples).
        op: The operation.
        max_per_box: Capacity of a box.

    Returns:
        Contents of every box after the operation.

    Raises:
        EntitylensError: If the operation is impossible in ``boxes`` (box out of range, an object that is
            not where the operation says, a put of an object already in a box, or a box over capacity).

    """
    n = len(boxes)
    for b in op.boxes:
        if not 0 <= b < n:
            raise _box_range_error(b, n, f"{op.kind} operation")
    if not op.objects:
        raise EntitylensError(f"{op.kind} operation on box {op.box} has no objects; name at least one object")
    if len(set(op.objects)) != len(op.objects):
        raise EntitylensError(f"{op.kind} operation names an object twice ({op.objects}); name each object once")
    new = list(boxes)
    src = set(boxes[op.box])
    if op.kind in ("move", "remove", "move_contents"):
        missing = [o for o in op.objects if o not in src]
        if missing:
            raise EntitylensError(
                f"{op.kind} operation takes {missing[0]!r} from box {op.box}, which holds "
                f"{list(boxes[op.box]) or 'nothing'}; take only objects that are in the box"
            )
        if op.kind == "move_contents" and len(op.objects) != len(src):
            raise EntitylensError(
                f"move_contents operation lists {list(op.objects)} but box {op.box} holds "
                f"{list(boxes[op.box])}; "
                "list the whole contents or use a move"
            )
        if op.dest is not None and op.dest == op.box:
            raise EntitylensError(f"move from box {op.box} to itself; choose a different destination box")
        new[op.box] = tuple(o for o in boxes[op.box] if o not in op.objects)
        if op.dest is not None:
            if len(boxes[op.dest]) + len(op.objects) > max_per_box:
                raise EntitylensError(
                    f"moving {len(op.objects)} objects into box {op.dest} "
                    f"(holding {len(boxes[op.dest])}) exceeds "
                    f"the capacity {max_per_box}; move fewer objects"
                )
            new[op.dest] = sorted_contents(boxes[op.dest] + op.objects)
    else:  # put
        for o in op.objects:
            for i, held in enumerate(boxes):
                if o in held:
                    raise EntitylensError(
                        f"put of {o!r} into box {op.box} but it is already in box {i}; put only objects in no box"
                    )
        if len(boxes[op.box]) + len(op.objects) > max_per_box:
            raise EntitylensError(
                f"putting {len(op.objects)} objects into box {op.box} (holding {len(boxes[op.box])}) exceeds "
                f"the capacity {max_per_box}; put fewer objects"
            )
        new[op.box] = sorted_contents(boxes[op.box] + op.objects)
    return tuple(new)


def replay(initial: Boxes, operations: Sequence[Operation], max_per_box: int = MAX_PER_BOX) -> list[Boxes]:
    """World states after every prefix of ``operations``.

    Args:
        initial: The initial contents.
        operations: The operations, in order.
        max_per_box: Capacity of a box.

    Returns:
        ``len(operations) + 1`` states: ``[initial, after op 1, ..., after op k]``.

    """
    states = [validate_boxes(initial, max_per_box)]
    for op in operations:
        states.append(apply_operation(states[-1], op, max_per_box))
    return states


def count_numops(
    operations: Sequence[Operation], num_boxes: int = NUM_BOXES
) -> tuple[tuple[int, ...], tuple[dict[str, int], ...]]:
    """Per box, how many operations changed it, in total and by operation type.

    Args:
        operations: A prefix of operations.
        num_boxes: Number of boxes.

    Returns:
        ``(numops, numops_by_op)``: a count per box, and per box a dict with keys ``move``, ``remove``,
        ``put`` (in that order, as K&S write it).

    """
    numops = [0] * num_boxes
    by_op = [dict.fromkeys(OP_KINDS, 0) for _ in range(num_boxes)]
    for op in operations:
        for b in op.boxes:
            if not 0 <= b < num_boxes:
                raise _box_range_error(b, num_boxes, f"{op.kind} operation")
            numops[b] += 1
            by_op[b][op.counted_kind] += 1
    return tuple(numops), tuple(by_op)


@dataclass(frozen=True)
class Scenario:
    """An initial world state plus a full operation sequence.

    Attributes:
        sample_id: Scenario id (index in its seed's scenario stream).
        initial: Initial contents of every box.
        operations: All sampled operations, in order.

    """

    sample_id: int
    initial: Boxes
    operations: tuple[Operation, ...]

    @property
    def num_boxes(self) -> int:
        """Number of boxes."""
        return len(self.initial)

    @property
    def signature(self) -> tuple[int, ...]:
        """Number of objects per box in the initial state (the split key)."""
        return tuple(len(b) for b in self.initial)


def _nonempty_subset(rng: random.Random, contents: Contents) -> Contents:
    """K&S ``random_nonempty_subset``: one fair coin per object, all redrawn until something is chosen."""
    while True:
        out = tuple(o for o in contents if rng.randrange(2) == 0)
        if out:
            return out


def sample_initial(
    rng: random.Random,
    vocabulary: Sequence[str],
    num_boxes: int = NUM_BOXES,
    max_per_box: int = MAX_PER_BOX,
    expected_per_box: float = 2.0,
) -> Boxes:
    """Sample an initial world state (K&S ``sample_initial_world_state``).

    Args:
        rng: The scenario's generator.
        vocabulary: Objects to draw from (their order matters for determinism only).
        num_boxes: Number of boxes.
        max_per_box: Capacity of a box.
        expected_per_box: Poisson mean of the number of objects per box (before capping).

    Returns:
        Contents of every box.

    """
    if num_boxes * max_per_box > len(vocabulary):
        raise EntitylensError(
            f"{num_boxes} boxes of up to {max_per_box} objects need {num_boxes * max_per_box} objects "
            "but the "
            f"vocabulary holds {len(vocabulary)}; use a larger vocabulary, fewer boxes or a lower max_per_box"
        )
    while True:
        counts = [poisson(rng, expected_per_box) for _ in range(num_boxes)]
        if sum(counts) <= len(vocabulary):
            break
    boxes: list[Contents] = []
    used: set[str] = set()
    for n in counts:
        void = [o for o in vocabulary if o not in used]
        chosen = rng.sample(void, min(n, max_per_box))
        used.update(chosen)
        boxes.append(sorted_contents(chosen))
    return tuple(boxes)


def sample_operations(
    rng: random.Random,
    initial: Boxes,
    vocabulary: Sequence[str],
    num_operations: int = 12,
    max_per_box: int = MAX_PER_BOX,
    expected_per_box: float = 2.0,
    move_contents: bool = False,
    max_ops_per_box: int | None = None,
) -> tuple[Operation, ...]:
    """Sample an operation sequence from ``initial`` (K&S ``sample_operation_sequences``).

    Args:
        rng: The scenario's generator.
        initial: The initial contents.
        vocabulary: Objects that puts draw from (those in no box).
        num_operations: Number of operations.
        max_per_box: Capacity of a box.
        expected_per_box: The initial Poisson mean; puts use ``max(1, int(expected_per_box / 2))``.
        move_contents: Write a move of a box's whole contents as a ``move_contents`` operation (the
            K&S ``--all_contents_operation`` variant). The random draws are the same either way.
        max_ops_per_box: Cap on the operations that change any one box (a move counts for both of its
            boxes); a draw that would exceed it is redrawn like any invalid draw, and sampling stops early
            (fewer operations) when 200 draws in a row are invalid. ``None`` (K&S): no cap, and the draws
            are exactly K&S's.

    Returns:
        The operations, in order.

    """
    num_boxes = len(initial)
    if num_boxes < 2:
        raise EntitylensError(f"operations need at least 2 boxes, got {num_boxes}; use num_boxes >= 2")
    put_mean = max(1, int(expected_per_box / 2))
    boxes = list(initial)
    ops: list[Operation] = []
    touched = [0] * num_boxes
    cap = max_ops_per_box
    for _ in range(num_operations):
        tries = 0
        while True:
            tries += 1
            if cap is not None and tries > 200:
                return tuple(ops)
            kind = rng.choice(_SAMPLED_KINDS)
            box = rng.randrange(num_boxes)
            if cap is not None and touched[box] >= cap:
                continue
            if kind == "move":
                if not boxes[box]:
                    continue
                dest = rng.choice([b for b in range(num_boxes) if b != box])
                if cap is not None and touched[dest] >= cap:
                    continue
                objs = _nonempty_subset(rng, boxes[box])
                if len(objs) + len(boxes[dest]) > max_per_box:
                    continue
                whole = len(objs) == len(boxes[box])
                op = Operation("move_contents" if (move_contents and whole) else "move", objs, box, dest)
            elif kind == "put":
                n = poisson(rng, put_mean)
                if n < 1 or n + len(boxes[box]) > max_per_box:
                    continue
                used = {o for b in boxes for o in b}
                void = [o for o in vocabulary if o not in used]
                op = Operation("put", sorted_contents(rng.sample(void, n)), box)
            else:  # remove
                if not boxes[box]:
                    continue
                op = Operation("remove", _nonempty_subset(rng, boxes[box]), box)
            break
        boxes = list(apply_operation(tuple(boxes), op, max_per_box))
        ops.append(op)
        for b in op.boxes:
            touched[b] += 1
    return tuple(ops)


def sample_scenario(
    seed: int,
    index: int,
    vocabulary: Sequence[str],
    num_operations: int = 12,
    num_boxes: int = NUM_BOXES,
    max_per_box: int = MAX_PER_BOX,
    expected_per_box: float = 2.0,
    move_contents: bool = False,
    max_ops_per_box: int | None = None,
) -> Scenario:
    """Sample scenario ``index`` of ``seed``: an initial state and ``num_operations`` operations.

    Args:
        seed: Dataset seed.
        index: Scenario index within the seed's stream (becomes ``sample_id``).
        vocabulary: Object vocabulary.
        num_operations: Operations per scenario.
        num_boxes: Number of boxes.
        max_per_box: Capacity of a box.
        expected_per_box: Poisson mean of the initial number of objects per box.
        move_contents: Use ``move_contents`` operations for whole-box moves.
        max_ops_per_box: Cap on the operations that change one box (see :func:`sample_operations`).

    Returns:
        The scenario (identical for identical arguments, in any process).

    """
    rng = scenario_rng(seed, index)
    initial = sample_initial(rng, vocabulary, num_boxes, max_per_box, expected_per_box)
    ops = sample_operations(
        rng, initial, vocabulary, num_operations, max_per_box, expected_per_box, move_contents, max_ops_per_box
    )
    return Scenario(sample_id=index, initial=initial, operations=ops)
