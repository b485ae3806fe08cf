"""Paired significance tests for base-vs-variant comparisons on the same items.

The comparison tables use the **exact McNemar test**: for the items both models answered, only the
discordant pairs carry information — ``b`` = items the base got right and the variant wrong, ``c`` = the
reverse. Under the null hypothesis (equal accuracy) each discordant item is a fair coin, so
``p = min(1, 2 * P[Binomial(b + c, 1/2) <= min(b, c)])`` (two-sided). Computed exactly with integer
binomial coefficients, so it is correct for any sample size (no chi-square approximation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class McNemarResult:
    """Outcome of an exact McNemar test.

    Attributes:
        n: Number of paired items.
        base_only: Items only the base model got right (``b``).
        variant_only: Items only the variant got right (``c``).
        p_value: Two-sided exact p-value (1.0 when there are no discordant pairs).

    """

    n: int
    base_only: int
    variant_only: int
    p_value: float


def exact_mcnemar(base_correct: Sequence[bool], variant_correct: Sequence[bool]) -> McNemarResult:
    """Exact two-sided McNemar test on paired binary outcomes.

    Args:
        base_correct: Per item, whether the base model was right.
        variant_correct: Per item (same order), whether the variant was right.

    Returns:
        The discordant counts and the exact p-value.

    Raises:
        ValueError: If the two sequences differ in length.

    """
    if len(base_correct) != len(variant_correct):
        raise ValueError(
            f"paired test needs the same items: got {len(base_correct)} and {len(variant_correct)} outcomes"
        )
    b = sum(1 for x, y in zip(base_correct, variant_correct) if x and not y)
    c = sum(1 for x, y in zip(base_correct, variant_correct) if y and not x)
    return McNemarResult(n=len(base_correct), base_only=b, variant_only=c, p_value=mcnemar_p(b, c))


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts ``b`` and ``c``."""
    m = b + c
    if m == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(m, i) for i in range(k + 1))
    # Exact rational arithmetic, then one division: no underflow for large m.
    return min(1.0, 2 * tail / 2**m)
