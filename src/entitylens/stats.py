"""Intervals and paired tests whose unit is the state (or scenario), not the box row.

The 7 box answers of one generated statement come from one generation and are strongly dependent, and
probe rows of one state (or one scenario) share almost everything. Treating them as independent rows
makes intervals too narrow and p-values too small. This module is the one place where entitylens turns
rows into uncertainty, for the evaluation and the probes alike (pure Python + numpy, no torch):

* :func:`clustered_wilson` -- the interval of a proportion: the **Wilson score interval on the effective
  sample size** ``n / deff``, where ``deff`` (>= 1) is the design effect of the clusters (Kish): the ratio of
  the cluster-robust variance of the mean to the binomial one. With one row per cluster it is the plain
  Wilson interval; unlike Wald it never collapses to ``[0, 0]`` at 0 successes.
* :func:`paired_state_test` -- base vs variant on the same rows: the accuracy difference, its **percentile
  cluster-bootstrap** interval (states resampled with replacement), and the two-sided p-value of the exact
  **paired randomization test over states** (under the null the two models' answers are exchangeable within
  each state; the statistic's exact distribution is built by convolution, no Monte Carlo). With one row per
  state this test *is* the exact McNemar test. The row-level exact McNemar p-value is kept as a secondary,
  labelled number.
* :func:`cluster_bootstrap` -- the same resampling for any statistic (the probes' balanced accuracy, F1).
* :func:`exact_mcnemar` -- the row-level exact McNemar test (binomial on the discordant rows).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from entitylens.errors import EntitylensError

Z95 = 1.959963984540054
"""Normal quantile of a two-sided 95% interval."""

INTERVAL_METHOD = "Wilson score interval on the design-effect-adjusted n (clusters: states)"
"""How every proportion's 95% interval is computed (figure captions and CSV ``test`` columns say so)."""

PAIRED_TEST = "paired randomization test over states (exact, two-sided)"
"""The default paired test of two models on the same states."""

ROW_TEST = "exact McNemar over box rows (treats rows as independent)"
"""The secondary, row-level test (kept for comparison with earlier reports)."""

BOOTSTRAP_RESAMPLES = 2000
"""Resamples of the cluster bootstrap."""


def wilson_interval(successes: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of ``successes / n`` (``n`` may be fractional: an effective sample size).

    Returns ``(nan, nan)`` when ``n == 0``.
    """
    if n <= 0:
        return math.nan, math.nan
    p = min(1.0, max(0.0, successes / n))
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _cluster_sums(values: Sequence[float] | np.ndarray, clusters: Sequence[Hashable]) -> tuple[np.ndarray, np.ndarray]:
    if len(values) != len(clusters):
        raise EntitylensError(f"{len(values)} values but {len(clusters)} cluster labels; pass one label per value")
    index: dict[Hashable, int] = {}
    ids = np.array([index.setdefault(c, len(index)) for c in clusters], dtype=np.int64)
    v = np.asarray(values, dtype=np.float64)
    sums = np.bincount(ids, weights=v, minlength=len(index))
    sizes = np.bincount(ids, minlength=len(index)).astype(np.float64)
    return sums, sizes


def design_effect(values: Sequence[float], clusters: Sequence[Hashable]) -> float:
    """Kish design effect of the mean of ``values`` under clustering (>= 1; 1 when undefined).

    The cluster-robust variance of the mean, ``C/(C-1) * sum_c (sum_{i in c} (y_i - p))^2 / n^2``, divided by
    the variance for independent rows, ``p(1-p)/n`` (for 0/1 values; the sample variance otherwise).
    """
    n = len(values)
    sums, sizes = _cluster_sums(values, clusters)
    c = len(sums)
    if n < 2 or c < 2:
        return 1.0
    v = np.asarray(values, dtype=np.float64)
    p = float(v.mean())
    srs = float(v.var()) / n
    if srs <= 0:
        return 1.0
    robust = c / (c - 1) * float(np.sum((sums - sizes * p) ** 2)) / (n * n)
    return max(1.0, robust / srs)


def clustered_wilson(
    correct: Sequence[bool], clusters: Sequence[Hashable], z: float = Z95
) -> tuple[float, float]:
    """95% interval of a proportion whose rows come in clusters (see the module docstring).

    Args:
        correct: One 0/1 outcome per row.
        clusters: The cluster (state) of each row.
        z: Normal quantile.

    Returns:
        ``(low, high)``; ``(nan, nan)`` for no rows.
    """
    n = len(correct)
    if n == 0:
        return math.nan, math.nan
    k = float(sum(bool(x) for x in correct))
    n_eff = n / design_effect([float(bool(x)) for x in correct], clusters)
    return wilson_interval(k / n * n_eff, n_eff, z)


def cluster_bootstrap(
    statistic: Callable[[np.ndarray], float],
    n_clusters: int,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> np.ndarray:
    """Values of ``statistic`` on cluster resamples (clusters drawn with replacement; ``nan`` kept).

    Args:
        statistic: Maps an array of cluster indices (with repeats) to a number.
        n_clusters: Number of clusters.
        resamples: Resamples.
        seed: Seed of the resampling (a fixed seed gives byte-identical outputs).

    Returns:
        ``[resamples]`` statistic values.
    """
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_clusters, size=(resamples, n_clusters))
    return np.array([statistic(d) for d in draws], dtype=np.float64)


def randomization_p(differences: Sequence[int]) -> float:
    """Exact two-sided p-value of the paired randomization (sign-flip) test on integer cluster differences.

    Under the null each cluster's difference ``d_c`` is equally likely to be ``+d_c`` or ``-d_c``; the
    statistic is ``S = sum_c d_c``. The exact null distribution of ``S`` is built by convolving the clusters'
    two-point distributions, and ``p = P(|S| >= |s_observed|)``.
    """
    d = [abs(int(x)) for x in differences if int(x) != 0]
    observed = abs(sum(int(x) for x in differences))
    if not d:
        return 1.0
    total = sum(d)
    dist = np.zeros(2 * total + 1, dtype=np.float64)
    dist[total] = 1.0
    for x in d:
        new = np.zeros_like(dist)
        new[x:] += 0.5 * dist[:-x]
        new[:-x] += 0.5 * dist[x:]
        dist = new
    s = np.arange(-total, total + 1)
    return float(min(1.0, dist[np.abs(s) >= observed].sum()))


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


@dataclass(frozen=True)
class PairedTest:
    """A paired base-vs-variant comparison on the same rows, with the state as the unit.

    Attributes:
        n: Rows.
        n_clusters: States (clusters) the rows belong to.
        base_accuracy: Base accuracy over the rows.
        variant_accuracy: Variant accuracy over the rows.
        difference: ``variant - base``.
        ci_low: Lower end of the 95% cluster-bootstrap interval of the difference.
        ci_high: Upper end.
        p_value: Exact paired randomization test over states (two-sided).
        base_only: Rows only the base got right.
        variant_only: Rows only the variant got right.
        p_value_rows: Row-level exact McNemar p-value (secondary; assumes independent rows).
    """

    n: int
    n_clusters: int
    base_accuracy: float
    variant_accuracy: float
    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    base_only: int
    variant_only: int
    p_value_rows: float


def paired_state_test(
    base: Sequence[bool],
    variant: Sequence[bool],
    clusters: Sequence[Hashable],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> PairedTest:
    """Compare two models' 0/1 outcomes on the same rows with the state (cluster) as the unit.

    Args:
        base: Per row, whether the base model was right.
        variant: Per row (same order), whether the variant was right.
        clusters: Per row, its state.
        resamples: Cluster-bootstrap resamples for the interval.
        seed: Seed of the bootstrap.

    Returns:
        The :class:`PairedTest`.

    Raises:
        EntitylensError: Sequences of different lengths.
    """
    n = len(base)
    if not (len(variant) == len(clusters) == n):
        raise EntitylensError(
            f"paired test needs one base, variant and state per row: got {n}, {len(variant)}, {len(clusters)}"
        )
    x = np.asarray([bool(v) for v in base], dtype=np.float64)
    y = np.asarray([bool(v) for v in variant], dtype=np.float64)
    b = int(np.sum((x == 1) & (y == 0)))
    c = int(np.sum((x == 0) & (y == 1)))
    if n == 0:
        return PairedTest(0, 0, math.nan, math.nan, math.nan, math.nan, math.nan, 1.0, 0, 0, 1.0)
    sum_x, sizes = _cluster_sums(x, clusters)
    sum_y, _ = _cluster_sums(y, clusters)
    diffs = (sum_y - sum_x).round().astype(np.int64)
    p = randomization_p(diffs.tolist())

    def stat(idx: np.ndarray) -> float:
        return float((sum_y[idx].sum() - sum_x[idx].sum()) / sizes[idx].sum())

    boot = cluster_bootstrap(stat, len(sizes), resamples, seed)
    lo, hi = (float(v) for v in np.quantile(boot, [0.025, 0.975]))
    acc_x, acc_y = float(x.mean()), float(y.mean())
    return PairedTest(
        n=n, n_clusters=len(sizes), base_accuracy=acc_x, variant_accuracy=acc_y, difference=acc_y - acc_x,
        ci_low=lo, ci_high=hi, p_value=p, base_only=b, variant_only=c, p_value_rows=mcnemar_p(b, c),
    )  # fmt: skip


__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "INTERVAL_METHOD",
    "PAIRED_TEST",
    "ROW_TEST",
    "Z95",
    "PairedTest",
    "McNemarResult",
    "cluster_bootstrap",
    "clustered_wilson",
    "design_effect",
    "exact_mcnemar",
    "mcnemar_p",
    "paired_state_test",
    "randomization_p",
    "wilson_interval",
]
