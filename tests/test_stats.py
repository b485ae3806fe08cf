import pytest

from entitylens.stats import exact_mcnemar, mcnemar_p

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("b,c", [(0, 0), (0, 1), (1, 0), (3, 7), (10, 10), (0, 25), (40, 61), (300, 251)])
def test_mcnemar_matches_scipy_binomtest(b, c):
    expected = 1.0 if b + c == 0 else scipy_stats.binomtest(min(b, c), b + c, 0.5).pvalue
    assert mcnemar_p(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_mcnemar_hand_computed():
    # b=0, c=5: p = 2 * (1/2)^5 = 1/16
    assert mcnemar_p(0, 5) == pytest.approx(1 / 16)
    # b=1, c=4: tail = C(5,0)+C(5,1) = 6 -> p = 2*6/32 = 0.375
    assert mcnemar_p(1, 4) == pytest.approx(0.375)


def test_exact_mcnemar_counts_discordant_pairs_only():
    base = [True, True, False, False, True, False]
    var = [True, False, True, True, True, False]
    r = exact_mcnemar(base, var)
    assert (r.n, r.base_only, r.variant_only) == (6, 1, 2)
    assert r.p_value == pytest.approx(mcnemar_p(1, 2))


def test_exact_mcnemar_length_mismatch():
    with pytest.raises(ValueError, match="same items"):
        exact_mcnemar([True], [True, False])


# ------------------------------------------------------------------------------------------------
# Intervals and paired tests with the state as the unit (entitylens.stats)
# ------------------------------------------------------------------------------------------------
import itertools  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from entitylens.stats import (  # noqa: E402
    clustered_wilson,
    design_effect,
    paired_state_test,
    randomization_p,
    wilson_interval,
)


def test_wilson_hand_computed_and_never_collapses():
    # 0/5: centre = z^2/(2n) / (1 + z^2/n), half = z*sqrt(z^2/(4n^2)) / (1 + z^2/n)
    z = 1.959963984540054
    lo, hi = wilson_interval(0, 5)
    assert lo == 0.0 and hi == pytest.approx((z * z / 10 + z * math.sqrt(z * z / 100)) / (1 + z * z / 5))
    assert hi == pytest.approx(0.4345, abs=1e-4)
    lo, hi = wilson_interval(5, 5)
    assert hi == 1.0 and lo == pytest.approx(1 - 0.4345, abs=1e-4)
    # scipy's binomtest(...).proportion_ci(method="wilson") is the same interval
    ci = scipy_stats.binomtest(7, 20).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(7, 20) == pytest.approx((ci.low, ci.high), abs=1e-6)


def test_one_row_per_cluster_is_plain_wilson():
    rng = np.random.default_rng(0)
    y = rng.random(50) < 0.3
    assert design_effect(y.astype(float).tolist(), list(range(50))) == pytest.approx(1.0, abs=0.2)
    lo, hi = clustered_wilson(y.tolist(), list(range(50)))
    plain = wilson_interval(int(y.sum()), 50)
    assert lo <= plain[0] + 1e-12 and hi >= plain[1] - 1e-12  # deff >= 1 never narrows it


def _clustered_sample(rng: np.random.Generator, states: int, rows: int) -> tuple[list[bool], list[int]]:
    # 7 strongly dependent rows per state: a per-state skill drawn once, rows right with that probability
    skill = rng.beta(0.6, 0.6, size=states)
    y = rng.random((states, rows)) < skill[:, None]
    return y.ravel().tolist(), np.repeat(np.arange(states), rows).tolist()


def test_clustered_wilson_covers_where_row_wilson_does_not():
    rng = np.random.default_rng(1)
    truth = 0.5  # E[Beta(0.6, 0.6)]
    hit_cluster = hit_rows = 0
    trials = 400
    for _ in range(trials):
        y, c = _clustered_sample(rng, states=20, rows=7)
        lo, hi = clustered_wilson(y, c)
        hit_cluster += lo <= truth <= hi
        lo, hi = wilson_interval(sum(y), len(y))
        hit_rows += lo <= truth <= hi
    assert hit_cluster / trials >= 0.90
    assert hit_rows / trials <= 0.75  # treating rows as independent is far too narrow here


def _brute_force_p(differences: list[int]) -> float:
    observed = abs(sum(differences))
    count = 0
    for signs in itertools.product((-1, 1), repeat=len(differences)):
        count += abs(sum(s * d for s, d in zip(signs, differences))) >= observed
    return count / 2 ** len(differences)


@given(st.lists(st.integers(min_value=-7, max_value=7), min_size=0, max_size=11))
@settings(max_examples=60, deadline=None)
def test_randomization_p_equals_enumeration(differences):
    assert randomization_p(differences) == pytest.approx(_brute_force_p(differences), abs=1e-12)


@given(st.integers(0, 30), st.integers(0, 30), st.integers(0, 30))
@settings(max_examples=60, deadline=None)
def test_one_row_per_state_is_exact_mcnemar(b, c, same):
    base = [True] * b + [False] * c + [True] * same
    var = [False] * b + [True] * c + [True] * same
    t = paired_state_test(base, var, list(range(len(base))), resamples=50)
    assert t.p_value == pytest.approx(mcnemar_p(b, c), abs=1e-12)
    assert t.p_value_rows == pytest.approx(mcnemar_p(b, c), abs=1e-12)


def test_state_unit_is_more_conservative_than_rows_on_dependent_answers():
    # 16 states x 7 boxes; the variant is better on whole states (its 7 answers move together)
    rng = np.random.default_rng(3)
    base, var, states = [], [], []
    for s in range(16):
        a = bool(rng.random() < 0.5)
        v = a or bool(rng.random() < 0.5)
        base += [a] * 7
        var += [v] * 7
        states += [s] * 7
    t = paired_state_test(base, var, states, seed=0)
    assert t.p_value_rows < 0.01 < t.p_value  # rows look decisive; states do not
    # the interval is a direct bootstrap over states, written here independently
    draws = np.random.default_rng(0).integers(0, 16, size=(2000, 16))
    b, v = np.array(base).reshape(16, 7), np.array(var).reshape(16, 7)
    diffs = [(v[d].sum() - b[d].sum()) / (7 * 16) for d in draws]
    assert (t.ci_low, t.ci_high) == pytest.approx(tuple(np.quantile(diffs, [0.025, 0.975])), abs=1e-12)
