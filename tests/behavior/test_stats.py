import pytest

from entitylens.behavior.stats import exact_mcnemar, mcnemar_p

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
