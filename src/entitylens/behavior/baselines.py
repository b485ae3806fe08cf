"""Pseudo-models that need no weights: the paper's random baseline and two trivial references.

* ``random`` — KST24's random baseline: for each box, k ~ Uniform{0..3} draws *with replacement* from the
  objects *mentioned with that box* in the prompt (its initial description and every operation that names
  it), duplicates dropped (what ``numpy.random.choice(candidates, k)`` does by default). Drawing with
  replacement reproduces the paper's numops-0 accuracy (41.8 % on our paper-profile set vs the paper's
  41.1 %); drawing ``min(k, candidates)`` objects without replacement gives 53.7 %.
* ``nothing`` — every box "contains nothing".
* ``initial`` — copy the initial description, ignoring every operation.

Each is deterministic for ``(seed, state)``: the random draw is seeded from a hash of the seed and the
state id (not Python's salted ``hash``), so reruns, shards and batch sizes give identical predictions.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from entitylens.task.prompts import statement_text
from entitylens.task.types import State

BASELINES: tuple[str, ...] = ("random", "nothing", "initial")
"""Model specs served by :func:`baseline_statement` instead of a checkpoint."""


def mentioned_objects(state: State) -> tuple[tuple[str, ...], ...]:
    """Per box, the objects mentioned with it in the prompt (initial contents + operations naming it).

    Args:
        state: The state.

    Returns:
        One alphabetical tuple per box.

    """
    mentioned: list[set[str]] = [set(c) for c in state.initial]
    for op in state.operations:
        for b in op.boxes:
            mentioned[b].update(op.objects)
    return tuple(tuple(sorted(m)) for m in mentioned)


def _rng(seed: int, state: State) -> random.Random:
    digest = hashlib.sha256(f"{seed}|{state.state_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def random_contents(state: State, seed: int = 0, max_objects: int = 3) -> tuple[tuple[str, ...], ...]:
    """KST24's random baseline prediction for every box of ``state``.

    Args:
        state: The state.
        seed: Seed of the draw.
        max_objects: Largest number of draws for a box (the paper: 3); draws are with replacement, so a
            box gets at most this many distinct objects.

    Returns:
        Predicted contents per box, alphabetical.

    """
    rng = _rng(seed, state)
    out = []
    for candidates in mentioned_objects(state):
        k = rng.randint(0, max_objects)
        drawn = {rng.choice(candidates) for _ in range(k)} if candidates else set()
        out.append(tuple(sorted(drawn)))
    return tuple(out)


def baseline_statement(name: str, state: State, seed: int = 0) -> str:
    """The statement a baseline pseudo-model writes for ``state`` (same form as a model's output).

    Args:
        name: One of :data:`BASELINES`.
        state: The state.
        seed: Seed (``random`` only).

    Returns:
        The statement text (``"Box 0 contains ..., Box 6 contains ...."``).

    Raises:
        KeyError: If ``name`` is not a baseline.

    """
    contents: Sequence[Sequence[str]]
    if name == "random":
        contents = random_contents(state, seed)
    elif name == "nothing":
        contents = [()] * state.num_boxes
    elif name == "initial":
        contents = state.initial
    else:
        raise KeyError(name)
    return statement_text(contents)
