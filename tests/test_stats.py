"""Intervals and paired tests: against hand-computed values and scipy's own, and the verdict rule."""
import math

import numpy as np
import pytest

from safesub_core.errors import SafesubError
from safesub_core.stats import (Estimate, decimals, mcnemar, mean_interval, paired_bootstrap, rate_interval, rate_of,
                                verdict)


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval written out (the textbook formula), to check the library call against."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize("k, n", [(0, 10), (5, 10), (10, 10), (1, 6), (26, 105), (79, 105)])
def test_rate_interval_is_the_wilson_interval(k, n):
    est = rate_interval(k, n)
    lo, hi = wilson(k, n)
    assert est.value == pytest.approx(k / n) and est.n == n
    assert (est.lo, est.hi) == pytest.approx((max(0.0, lo), min(1.0, hi)), abs=1e-9)


def test_known_wilson_values_and_edge_cases():
    est = rate_interval(5, 10)
    assert (round(est.lo, 4), round(est.hi, 4)) == (0.2366, 0.7634)
    assert rate_interval(0, 10).lo == 0.0 and round(rate_interval(0, 10).hi, 4) == 0.2775
    empty = rate_interval(0, 0)
    assert math.isnan(empty.value) and (empty.lo, empty.hi) == (0.0, 1.0)
    assert rate_of([True, False, True, True]) == rate_interval(3, 4)
    for k, n in ((3, 2), (-1, 4), (1.5, 4)):
        with pytest.raises(SafesubError, match="rate"):
            rate_interval(k, n)


def test_mean_interval_covers_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(1)
    small, large = rng.normal(2.0, 1.0, 20), rng.normal(2.0, 1.0, 400)
    a, b = mean_interval(small), mean_interval(large)
    assert a.lo < a.value < a.hi and b.lo < b.value < b.hi
    assert (b.hi - b.lo) < (a.hi - a.lo) / 2, "twenty times the prompts: a much narrower interval"
    t = 1.96 * large.std(ddof=1) / math.sqrt(large.size)  # the normal-theory half-width, for scale
    assert (b.hi - b.lo) / 2 == pytest.approx(t, rel=0.2)
    assert mean_interval(small) == a, "seeded: the same interval every time"
    assert mean_interval([3.0, 3.0, 3.0]) == Estimate(3.0, 3.0, 3.0, 3)
    one = mean_interval([1.5])
    assert one.value == 1.5 and math.isnan(one.lo)
    with pytest.raises(SafesubError, match="not a finite number"):
        mean_interval([1.0, float("nan")])


def test_mcnemar_is_the_exact_binomial_test_of_the_discordant_pairs():
    a = [True] * 10 + [False] * 10
    b = [True] * 2 + [False] * 8 + [True] * 1 + [False] * 9  # 8 pairs lost, 1 gained
    res = mcnemar(a, b)
    # exact two-sided binomial p for 1 of 9 at 1/2: 2 * (C(9,0) + C(9,1)) / 2^9 = 20 / 512
    assert res.p == pytest.approx(20 / 512) and res.n == 20
    assert res.diff == pytest.approx(3 / 20 - 10 / 20)
    assert mcnemar(a, a).p == 1.0
    with pytest.raises(SafesubError, match="same prompts"):
        mcnemar(a, b[:-1])


def test_paired_bootstrap_finds_a_shift_and_not_noise():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, 200)
    shifted = paired_bootstrap(a, a + 0.5 + rng.normal(0, 0.1, 200))
    assert shifted.lo > 0.4 and shifted.hi < 0.6 and shifted.p < 0.01
    noise = paired_bootstrap(a, a + rng.normal(0, 0.1, 200))
    assert noise.lo < 0 < noise.hi and noise.p > 0.05


def test_verdicts_follow_the_interval_not_the_point():
    assert verdict(Estimate(0.95, 0.91, 0.98, 100), 0.9) == "holds"
    assert verdict(Estimate(0.95, 0.85, 0.99, 20), 0.9) == "inconclusive", "the point passes, the interval crosses"
    assert verdict(Estimate(0.5, 0.4, 0.6, 100), 0.9) == "does not hold"
    assert verdict(Estimate(0.05, 0.01, 0.09, 100), 0.1, above=False) == "holds"
    assert verdict(Estimate(0.5, math.nan, math.nan, 1), 0.1) == "inconclusive"


def test_shown_decimals_follow_the_interval_width():
    assert decimals(0.41, 0.79) == 1  # +-0.19
    assert decimals(0.62, 0.66) == 2  # +-0.02
    assert decimals(0.5001, 0.5003) == 4
    assert Estimate(0.62, 0.41, 0.79, 24).text() == "0.6 [0.4, 0.8] n=24"
    assert Estimate(0.6234, 0.6034, 0.6434, 2400).columns("exact_match") == dict(
        exact_match=0.6234, exact_match_lo=0.6034, exact_match_hi=0.6434, exact_match_n=2400)
