"""Targeted evaluation states: fresh scenarios whose queried boxes have 0 to 8 operations (the testbed's sets).

The K&S sampler spreads 12 operations over 7 boxes, so a box rarely sees more than 3 of them. Here each
scenario has a *target* box that every operation draw picks with probability ``p_target`` (any box
otherwise; the K&S rules are unchanged: an invalid draw of type and box is redrawn, moves take a random
non-empty subset, puts Poisson(1) new objects, capacity 3). Scenario ``i`` aims at ``numops`` bucket
``i mod (max_numops + 1)`` for its target box and contributes the shortest prefix at which the target
box has exactly that many operations (a scenario that never gets there is skipped). Every box of the
state is scored, so the low buckets fill from the other boxes and buckets 3-7 from the targets.

States carry the K&S context (``State.context``), so the paper's protocol runs on them too; the compact
protocol renders them itself. Scenarios are seeded by ``(seed, index)`` in their own namespace, and the
default seed is used by no training stream, so the states are fresh.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from entitylens.errors import EntitylensError
from entitylens.task.generate import make_state
from entitylens.task.types import MAX_PER_BOX, NUM_BOXES, Operation, State, sorted_contents
from entitylens.task.vocab import BNC_OBJECTS
from entitylens.task.world import Boxes, Scenario, apply_operation, poisson, sample_initial

EVAL_SEED = 7_000_001
"""Seed of the standard testbed evaluation set (no training stream uses it)."""

VALIDATION_SEED = 7_000_002
"""Seed of the small validation set logged during training."""

DEFAULT_EVAL_STATES = 720
"""States in the standard evaluation set (80 scenarios per target bucket 0..8; 5,040 box rows, about
the size of KST24's test set)."""


def _subset(rng: random.Random, contents: Sequence[str]) -> tuple[str, ...]:
    while True:
        out = tuple(o for o in contents if rng.randrange(2) == 0)
        if out:
            return out


def targeted_operations(
    rng: random.Random,
    initial: Boxes,
    target: int,
    num_operations: int,
    p_target: float,
    vocabulary: Sequence[str] = BNC_OBJECTS,
) -> tuple[Operation, ...]:
    """Sample operations whose box is ``target`` with probability ``p_target`` per draw (K&S rules).

    Args:
        rng: The scenario's generator.
        initial: Initial contents.
        target: The box the draws favour.
        num_operations: Operations to sample.
        p_target: Probability that a draw's box is ``target`` (otherwise uniform over all boxes).
        vocabulary: Objects that puts draw from.

    Returns:
        The operations.
    """
    n = len(initial)
    boxes = initial
    ops: list[Operation] = []
    for _ in range(num_operations):
        while True:
            kind = rng.choice(("move", "remove", "put"))
            box = target if rng.random() < p_target else rng.randrange(n)
            if kind == "move":
                if not boxes[box]:
                    continue
                if rng.random() < 0.5:  # the target as source or, symmetrically, as destination
                    dest = rng.choice([b for b in range(n) if b != box])
                    src = box
                else:
                    src = rng.choice([b for b in range(n) if b != box])
                    dest = box
                    if not boxes[src]:
                        continue
                objs = _subset(rng, boxes[src])
                if len(objs) + len(boxes[dest]) > MAX_PER_BOX:
                    continue
                op = Operation("move", objs, src, dest)
            elif kind == "put":
                k = poisson(rng, 1)
                if k < 1 or k + len(boxes[box]) > MAX_PER_BOX:
                    continue
                used = {o for b in boxes for o in b}
                op = Operation(
                    "put", sorted_contents(rng.sample([o for o in vocabulary if o not in used], k)), box
                )
            else:
                if not boxes[box]:
                    continue
                op = Operation("remove", _subset(rng, boxes[box]), box)
            break
        boxes = apply_operation(boxes, op)
        ops.append(op)
    return tuple(ops)


def eval_states(
    seed: int = EVAL_SEED,
    num_states: int = DEFAULT_EVAL_STATES,
    max_numops: int = 8,
    p_target: float = 0.6,
    vocabulary: Sequence[str] = BNC_OBJECTS,
) -> list[State]:
    """The targeted evaluation set (see the module docstring).

    Args:
        seed: Seed (the default is the standard set's).
        num_states: States to return.
        max_numops: Highest target bucket (8 fills the paper's pooled "7+" bucket).
        p_target: Probability that an operation draw picks the target box.
        vocabulary: Object vocabulary (``DISJOINT_OBJECTS`` for a disjoint-vocabulary test).

    Returns:
        ``num_states`` states, in scenario order (``sample_id`` = scenario index).
    """
    if num_states < 1 or max_numops < 0 or not 0 <= p_target <= 1:
        raise EntitylensError(
            f"eval_states needs num_states >= 1, max_numops >= 0 and 0 <= p_target <= 1 "
            f"(got {num_states}, {max_numops}, {p_target}); pass valid values"
        )
    states: list[State] = []
    index = 0
    while len(states) < num_states:
        if index > 50 * num_states + 1000:
            raise EntitylensError("could not fill the evaluation set; raise p_target or lower max_numops")
        rng = random.Random(f"entitylens-testbed:eval:{int(seed)}:{index}")
        want = index % (max_numops + 1)
        target = rng.randrange(NUM_BOXES)
        initial = sample_initial(rng, vocabulary)
        ops = targeted_operations(rng, initial, target, 3 * want + 2, p_target, vocabulary)
        count = 0
        k = 0 if want == 0 else None
        for j, op in enumerate(ops):
            if k is not None:
                break
            count += target in op.boxes
            if count == want:
                k = j + 1
        if k is not None:
            sc = Scenario(sample_id=index, initial=initial, operations=ops)
            states.append(make_state(sc, k))
        index += 1
    return states
