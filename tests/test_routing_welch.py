"""Welch's t-test and the Student-t tail against scipy (scipy is used here only, never at runtime)."""

from __future__ import annotations

import math
import random

import pytest
from scipy import special, stats

from deployments.routing import betainc, t_cdf, t_sf, welch_from_moments, welch_t_test


def _samples(seed: int, n_a: int, n_b: int) -> tuple[list[float], list[float]]:
    rng = random.Random(seed)
    a = [rng.lognormvariate(0.1, 0.6) for _ in range(n_a)]
    b = [rng.gauss(1.0, 0.2 + seed * 0.1) for _ in range(n_b)]
    return a, b


@pytest.mark.parametrize("seed, n_a, n_b", [(0, 2, 2), (1, 3, 9), (2, 30, 30), (3, 50, 400), (4, 2000, 1500), (5, 12, 7)])
@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_matches_scipy(seed: int, n_a: int, n_b: int, alternative: str) -> None:
    a, b = _samples(seed, n_a, n_b)
    ours = welch_t_test(a, b, alternative)  # type: ignore[arg-type]
    ref = stats.ttest_ind(a, b, equal_var=False, alternative=alternative)
    assert ours.statistic == pytest.approx(float(ref.statistic), rel=1e-9, abs=1e-9)
    assert ours.df == pytest.approx(float(ref.df), rel=1e-9)
    assert ours.p_value == pytest.approx(float(ref.pvalue), rel=1e-6, abs=1e-9)


def test_detects_a_real_difference_and_its_sign() -> None:
    rng = random.Random(11)
    slow = [rng.gauss(1.3, 0.2) for _ in range(200)]
    fast = [rng.gauss(1.0, 0.2) for _ in range(200)]
    assert welch_t_test(slow, fast, "greater").p_value < 1e-20
    assert welch_t_test(fast, slow, "greater").p_value > 0.999999


@pytest.mark.parametrize("a, b", [(0.5, 0.5), (1.0, 1.0), (2.5, 0.5), (0.5, 2000.0), (2000.0, 0.5), (50.0, 50.0)])
def test_betainc_matches_scipy(a: float, b: float) -> None:
    for x in (0.0, 1e-9, 1e-3, 0.1, 0.5, 0.9, 0.999, 1 - 1e-9, 1.0):
        assert betainc(a, b, x) == pytest.approx(float(special.betainc(a, b, x)), abs=1e-10)


@pytest.mark.parametrize("df", [1.0, 2.5, 10.0, 123.4, 4000.0])
def test_t_tails_match_scipy(df: float) -> None:
    for t in (-40.0, -3.0, -0.2, 0.0, 0.2, 1.0, 2.5, 8.0, 40.0):
        assert t_sf(t, df) == pytest.approx(float(stats.t.sf(t, df)), rel=1e-7, abs=1e-12)
        assert t_cdf(t, df) == pytest.approx(float(stats.t.cdf(t, df)), rel=1e-7, abs=1e-12)


def test_degenerate_inputs() -> None:
    same = welch_from_moments(1.0, 0.0, 5, 1.0, 0.0, 5)
    assert math.isnan(same.statistic) and math.isnan(same.p_value)
    apart = welch_from_moments(2.0, 0.0, 5, 1.0, 0.0, 5)
    assert apart.statistic == math.inf and apart.p_value == 0.0
    with pytest.raises(ValueError, match="at least two samples"):
        welch_t_test([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="a > 0 and b > 0"):
        betainc(0.0, 1.0, 0.5)
