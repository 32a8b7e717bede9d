"""Welch's unequal-variance t-test in pure Python (no scipy in the serving path).

The Student-t tail comes from the regularized incomplete beta function, evaluated with the modified
Lentz continued fraction (Numerical Recipes, 3rd ed., section 6.4). Agrees with
``scipy.stats.ttest_ind(equal_var=False)`` to about 1e-9 or better (tests/test_routing_welch.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Alternative = Literal["greater", "less", "two-sided"]

_EPS = 1e-15
_FPMIN = 1e-300
_MAXIT = 10_000


@dataclass(frozen=True)
class WelchResult:
    statistic: float  # t; positive when mean(a) > mean(b)
    df: float  # Welch-Satterthwaite degrees of freedom
    p_value: float
    mean_a: float
    mean_b: float
    n_a: int
    n_b: int


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of I_x(a, b); converges fast for x < (a + 1) / (a + b + 2)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) >= _FPMIN else _FPMIN)
    h = d
    for m in range(1, _MAXIT + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) >= _FPMIN else _FPMIN)
        c = 1.0 + aa / c
        c = c if abs(c) >= _FPMIN else _FPMIN
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) >= _FPMIN else _FPMIN)
        c = 1.0 + aa / c
        c = c if abs(c) >= _FPMIN else _FPMIN
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float, y: float | None = None) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1.

    ``y`` may pass ``1 - x`` computed without cancellation (the t tail needs it when x is near 1).
    """
    if a <= 0 or b <= 0:
        raise ValueError("betainc needs a > 0 and b > 0")
    if y is None:
        y = 1.0 - x
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, y) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom."""
    if math.isnan(t) or math.isnan(df):
        return math.nan
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    t2 = t * t
    half_tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t2), t2 / (df + t2))  # P(T > |t|)
    return half_tail if t > 0 else 1.0 - half_tail


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    return t_sf(-t, df)


def _mean_var(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    mean = math.fsum(xs) / n
    return mean, math.fsum((x - mean) ** 2 for x in xs) / (n - 1)


def welch_from_moments(mean_a: float, var_a: float, n_a: int, mean_b: float, var_b: float, n_b: int,
                       alternative: Alternative = "greater") -> WelchResult:
    """Welch's test from summary statistics (sample variances with ddof=1)."""
    if n_a < 2 or n_b < 2:
        raise ValueError("Welch's t-test needs at least two samples on each side")
    se_a, se_b = var_a / n_a, var_b / n_b
    se2 = se_a + se_b
    diff = mean_a - mean_b
    if se2 == 0.0:  # both samples constant: like scipy, undefined unless the means differ
        t = math.nan if diff == 0 else math.copysign(math.inf, diff)
        df = float(n_a + n_b - 2)
    else:
        t = diff / math.sqrt(se2)
        df = se2 * se2 / (se_a * se_a / (n_a - 1) + se_b * se_b / (n_b - 1))
    if alternative == "greater":
        p = t_sf(t, df)
    elif alternative == "less":
        p = t_cdf(t, df)
    elif alternative == "two-sided":
        p = min(1.0, 2.0 * t_sf(abs(t), df)) if not math.isnan(t) else math.nan
    else:
        raise ValueError(f"unknown alternative {alternative!r}")
    return WelchResult(t, df, p, mean_a, mean_b, n_a, n_b)


def welch_t_test(a: Sequence[float], b: Sequence[float], alternative: Alternative = "greater") -> WelchResult:
    """Welch's t-test of mean(a) against mean(b); ``"greater"`` tests mean(a) > mean(b)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Welch's t-test needs at least two samples on each side")
    mean_a, var_a = _mean_var(a)
    mean_b, var_b = _mean_var(b)
    return welch_from_moments(mean_a, var_a, len(a), mean_b, var_b, len(b), alternative)
