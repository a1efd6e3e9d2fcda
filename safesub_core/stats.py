"""Intervals and paired tests for the rates and means safesub reports (docs/method.md, "Statistics").

Contract (every function validates its input and raises a one-line SafesubError for bad input):
- `rate_interval(k, n)` -> `Estimate`: the rate k/n with its Wilson score interval (scipy.stats.binomtest's
  `proportion_ci(method="wilson")`). With n = 0 the value is NaN and the interval [0, 1]: nothing is known.
- `mean_interval(values)` -> `Estimate`: the mean with a bootstrap interval (scipy.stats.bootstrap, BCa, seeded, so
  a result is reproducible). One value gives a NaN interval; values that are all equal give a zero-width one.
- `mcnemar(a, b)` -> `PairedTest`: two yes/no outcomes on the same prompts (a rate before and after, Top-K against
  Random); the exact McNemar test: a two-sided binomial test of the discordant pairs at p = 1/2.
- `paired_bootstrap(a, b)` -> `PairedTest`: two scores on the same prompts (margins, NLL); the mean of b - a with its
  bootstrap interval and a two-sided p-value (twice the smaller share of resampled means on either side of 0).
- `verdict(estimate, threshold, above=True)`: "holds" when the whole interval lies on the claimed side of the
  threshold, "does not hold" when it lies wholly on the other side, else "inconclusive".
- `decimals(lo, hi)`: how many decimals a value with this interval deserves (one significant digit of the
  half-width, at least one decimal, at most four), so the shown precision follows the evidence.
Confidence is 95% everywhere unless asked otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats as sps

from safesub_core.errors import SafesubError

CONFIDENCE = 0.95
RESAMPLES = 2000  # bootstrap resamples: the interval's ends move by well under a tenth of its width between seeds
VERDICTS = ("holds", "does not hold", "inconclusive")
MIN_PROMPTS = 2  # a difference of at most this many prompts is never claimed (nor decides a verdict or a check)


@dataclass(frozen=True)
class Estimate:
    """A rate or mean with its interval and the number of prompts behind it."""

    value: float
    lo: float
    hi: float
    n: int

    def text(self) -> str:
        """'0.62 [0.41, 0.79] n=24', at the precision the interval allows."""
        if math.isnan(self.value):
            return f"- n={self.n}"
        d = decimals(self.lo, self.hi)
        if math.isnan(self.lo):
            return f"{self.value:.{d}f} n={self.n}"
        return f"{self.value:.{d}f} [{self.lo:.{d}f}, {self.hi:.{d}f}] n={self.n}"

    @classmethod
    def of(cls, summary: dict, name: str) -> "Estimate":
        """The estimate `name` of a summary written by `columns` (a missing interval or n reads as unknown)."""
        return cls(float(summary[name]), float(summary.get(f"{name}_lo", math.nan)),
                   float(summary.get(f"{name}_hi", math.nan)), int(summary.get(f"{name}_n", 0) or 0))

    def value_text(self) -> str:
        """The value alone at the precision its interval allows ('-' when unknown)."""
        return "-" if math.isnan(self.value) else f"{self.value:.{decimals(self.lo, self.hi)}f}"

    def columns(self, name: str) -> dict:
        """{name: value, name_lo: lo, name_hi: hi, name_n: n}: the CSV columns of this estimate."""
        return {name: self.value, f"{name}_lo": self.lo, f"{name}_hi": self.hi, f"{name}_n": self.n}


@dataclass(frozen=True)
class PairedTest:
    """A paired comparison of b against a on the same n prompts: the mean difference b - a, its interval (NaN for
    McNemar, whose statistic is the discordant counts) and the two-sided p-value."""

    diff: float
    lo: float
    hi: float
    p: float
    n: int
    test: str


def _check_confidence(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise SafesubError(f"confidence {confidence}: must be in (0, 1)")
    return confidence


def rate_interval(k: int, n: int, confidence: float = CONFIDENCE) -> Estimate:
    """k successes out of n, with the Wilson score interval."""
    if int(n) != n or int(k) != k or n < 0 or not 0 <= k <= n:
        raise SafesubError(f"rate {k}/{n}: needs whole numbers with 0 <= k <= n")
    k, n = int(k), int(n)
    if n == 0:
        return Estimate(math.nan, 0.0, 1.0, 0)
    ci = sps.binomtest(k, n).proportion_ci(confidence_level=_check_confidence(confidence), method="wilson")
    return Estimate(k / n, float(ci.low), float(ci.high), n)


def rate_of(outcomes: Sequence[bool], confidence: float = CONFIDENCE) -> Estimate:
    """The rate of True among yes/no outcomes (one per prompt), with its Wilson interval."""
    values = [bool(x) for x in outcomes]
    return rate_interval(sum(values), len(values), confidence)


def _finite(values: Sequence[float], what: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).ravel()
    if not np.isfinite(x).all():
        raise SafesubError(f"{what}: holds a value that is not a finite number")
    return x


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE, seed: int = 0) -> Estimate:
    """The mean of per-prompt values with a BCa bootstrap interval."""
    x = _finite(values, "mean of scores")
    if x.size == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if x.size == 1:
        return Estimate(mean, math.nan, math.nan, 1)
    if np.ptp(x) == 0:
        return Estimate(mean, mean, mean, int(x.size))
    res = sps.bootstrap((x,), np.mean, confidence_level=_check_confidence(confidence), n_resamples=RESAMPLES,
                        method="BCa", rng=np.random.default_rng(seed))
    return Estimate(mean, float(res.confidence_interval.low), float(res.confidence_interval.high), int(x.size))


def _pair(a: Sequence, b: Sequence, what: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.size != b.size:
        raise SafesubError(f"{what}: the two sides score {a.size} and {b.size} prompts; a paired test needs the same "
                           "prompts on both")
    if a.size == 0:
        raise SafesubError(f"{what}: no prompts to compare")
    return a, b


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> PairedTest:
    """Exact McNemar test of two yes/no outcomes on the same prompts; diff is rate(b) - rate(a)."""
    a, b = _pair(a, b, "McNemar test")
    a, b = a.astype(bool), b.astype(bool)
    only_b, only_a = int((b & ~a).sum()), int((a & ~b).sum())
    p = 1.0 if only_a + only_b == 0 else float(sps.binomtest(only_b, only_a + only_b, 0.5).pvalue)
    return PairedTest(float(b.mean() - a.mean()), math.nan, math.nan, p, int(a.size), "mcnemar")


def paired_bootstrap(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE,
                     seed: int = 0) -> PairedTest:
    """Mean of b - a on the same prompts, its percentile bootstrap interval and a two-sided bootstrap p-value."""
    a, b = _pair(_finite(a, "paired scores"), _finite(b, "paired scores"), "paired bootstrap")
    d = b - a
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(RESAMPLES, d.size))].mean(axis=1)
    alpha = 1.0 - _check_confidence(confidence)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    if np.ptp(d) == 0:
        p = 1.0 if d[0] == 0 else 0.0
    else:
        p = float(min(1.0, 2 * min((means <= 0).mean(), (means >= 0).mean())))
    return PairedTest(float(d.mean()), float(lo), float(hi), p, int(d.size), "paired bootstrap")


def verdict(estimate: Estimate, threshold: float, above: bool = True) -> str:
    """'holds' if the interval lies wholly on the claimed side of `threshold` (above it when `above`), 'does not
    hold' if wholly on the other side, else 'inconclusive' (also when the interval is unknown)."""
    lo, hi = estimate.lo, estimate.hi
    if math.isnan(lo) or math.isnan(hi):
        return "inconclusive"
    if (lo > threshold) if above else (hi < threshold):
        return "holds"
    if (hi < threshold) if above else (lo > threshold):
        return "does not hold"
    return "inconclusive"


def decimals(lo: float, hi: float) -> int:
    """Decimals to show for a value whose interval is [lo, hi]: one significant digit of the half-width (1 to 4)."""
    half = (hi - lo) / 2 if math.isfinite(lo) and math.isfinite(hi) else math.nan
    if not half > 0:
        return 4 if half == 0 else 2
    return int(min(4, max(1, -math.floor(math.log10(half)))))
