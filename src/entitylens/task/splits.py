"""Train/dev/test splits bucketed by initial-state signature (as Kim & Schuster 2023).

The *signature* of a state is the number of objects in each box of its initial state, e.g.
``(2, 0, 3, 1, 1, 2, 0)``. K&S assign whole signatures to splits so that no initial configuration shape is
seen in both training and test data. Two deterministic assignments are offered:

* :func:`split_by_signature` splits a given list of states. Distinct signatures are sorted, shuffled with
  ``random.Random("entitylens-splits:<seed>")`` and assigned one by one to the split whose state count is
  furthest below its target (``fraction * number of states``; ties go to the earlier split), so the state
  proportions follow ``fractions`` closely even for small datasets.
* :func:`signature_split` assigns a single signature without looking at any data (a uniform draw seeded
  by the seed and the signature, cut at the cumulative fractions). The generator uses it for
  ``--split``, so ``train`` and ``test`` files generated from the same seed in separate runs never share a
  signature. The proportions of *states* then follow ``fractions`` only approximately.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from entitylens.errors import EntitylensError
from entitylens.task.types import State

SPLIT_NAMES: tuple[str, ...] = ("train", "dev", "test")
"""Names of the three splits, in order."""

DEFAULT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)
"""Default train/dev/test fractions."""


def signature(state: State) -> tuple[int, ...]:
    """Return the number of objects per box in the state's initial contents."""
    return tuple(len(b) for b in state.initial)


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Validate train/dev/test fractions (three non-negative numbers summing to 1).

    Raises:
        EntitylensError: If the fractions are invalid.

    """
    try:
        fr = tuple(float(x) for x in fractions)
    except (TypeError, ValueError):
        raise EntitylensError(
            f"split fractions {fractions!r} are not numbers; pass three numbers like 0.8,0.1,0.1"
        ) from None
    if len(fr) != 3 or any(not x >= 0 for x in fr) or abs(sum(fr) - 1.0) > 1e-9:
        raise EntitylensError(
            f"split fractions {fractions!r} must be three non-negative numbers summing to 1; e.g. 0.8,0.1,0.1"
        )
    return fr  # type: ignore[return-value]


def split_by_signature(
    states: Sequence[State], fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0
) -> dict[str, list[State]]:
    """Split states into train/dev/test so that no signature occurs in two splits.

    Args:
        states: The states (all prefixes of a scenario share its signature, so they stay together).
        fractions: Target fractions of states for train, dev and test.
        seed: Seed of the signature shuffle.

    Returns:
        ``{"train": [...], "dev": [...], "test": [...]}``, each in input order.

    """
    fr = check_fractions(fractions)
    counts: dict[tuple[int, ...], int] = {}
    for s in states:
        sig = signature(s)
        counts[sig] = counts.get(sig, 0) + 1
    sigs = sorted(counts)
    random.Random(f"entitylens-splits:{int(seed)}").shuffle(sigs)
    total = len(states)
    assigned = [0, 0, 0]
    where: dict[tuple[int, ...], int] = {}
    for sig in sigs:
        best = max((i for i in range(3) if fr[i] > 0), key=lambda i: (fr[i] * total - assigned[i], -i))
        where[sig] = best
        assigned[best] += counts[sig]
    out: dict[str, list[State]] = {name: [] for name in SPLIT_NAMES}
    for s in states:
        out[SPLIT_NAMES[where[signature(s)]]].append(s)
    return out


def signature_split(sig: Sequence[int], fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0) -> str:
    """Assign one signature to a split without looking at data (see the module docstring).

    Args:
        sig: Objects per box of an initial state.
        fractions: Train/dev/test fractions of the signature space.
        seed: Split seed.

    Returns:
        ``"train"``, ``"dev"`` or ``"test"``.

    """
    fr = check_fractions(fractions)
    u = random.Random(f"entitylens-split:{int(seed)}:{','.join(str(int(x)) for x in sig)}").random()
    acc = 0.0
    for name, f in zip(SPLIT_NAMES, fr, strict=True):
        acc += f
        if u < acc and f > 0:
            return name
    return next(name for name, f in zip(reversed(SPLIT_NAMES), reversed(fr), strict=True) if f > 0)
