"""Helpers for the activation-caching tests: hand-built boxes states rendered by the task module."""

from __future__ import annotations

from collections.abc import Sequence

from entitylens.task.text import render_context
from entitylens.task.types import BoxRow, Operation, State, sorted_contents
from entitylens.task.world import count_numops, replay


def make_state(
    sample_id: int,
    initial: Sequence[Sequence[str]],
    operations: Sequence[Operation] = (),
    variant: str = "base",
    form: str = "fewshot",
) -> State:
    """A State rendered by the task module's own text templates (the ground truth for role checks)."""
    init = tuple(sorted_contents(b) for b in initial)
    contents = replay(init, operations)[-1]
    numops, by_op = count_numops(operations, len(init))
    return State(
        sample_id=sample_id,
        initial=init,
        operations=tuple(operations),
        contents=tuple(contents),
        numops=numops,
        numops_by_op=by_op,
        context=render_context(init, operations, variant, form),
        variant=variant,
        extra={"form": form},
    )


INITIAL = (("car", "eggnog"), (), ("map",), ("bottle", "otamatone"), ("apple",), (), ("string",))
"""Seven boxes; 'otamatone' and 'eggnog' are multi-token for every tokenizer used here."""


def sample_states() -> list[State]:
    """Four states with 0..3 operations (some multi-token objects, every operation kind)."""
    ops = (
        Operation("move", ("eggnog",), 0, 1),
        Operation("remove", ("bottle", "otamatone"), 3),
        Operation("put", ("umbrella",), 5),
    )
    return [make_state(7, INITIAL, ops[:k]) for k in range(4)]


def sample_rows() -> list[BoxRow]:
    """Rows of :func:`sample_states` with prompts of different lengths (so batches are left-padded)."""
    states = sample_states()
    return [BoxRow(s, b) for s in states for b in (0, 3, 6)]
