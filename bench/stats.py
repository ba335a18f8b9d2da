"""Statistics of the benchmark studies (scipy does the distributions).

* :class:`Estimate`: mean over seeds, sample std, a two-sided Student-t interval (``scipy.stats.t.ppf``)
  and the t-test p-value of "mean = 0" (``scipy.stats.ttest_1samp``).
* :func:`paired_difference`: method A minus method B seed by seed (same seed = same initialisation, batches
  and labelled images), as an :class:`Estimate`.
* :func:`across_splits`: one comparison on several leave-one-site-out splits is a *family* of tests. Its
  p-values are **Holm**-adjusted (step-down, controls the family-wise error rate) and its intervals
  **Bonferroni**-adjusted (each at 1 - 0.05 / m, so all m cover together with 95 %); Holm has no matching
  interval, and an interval that excludes 0 at the Bonferroni level is also significant under Holm.
* :func:`efficiency_factor`: the data-efficiency factor with a percentile bootstrap over seeds
  (``scipy.stats.bootstrap``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

__all__ = [
    "CONFIDENCE",
    "Estimate",
    "across_splits",
    "crossing_n",
    "efficiency_factor",
    "holm",
    "paired_difference",
    "t_quantile",
]

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """Two-sided Student-t quantile ``t_{1 - (1 - confidence) / 2, df}`` (nan for df < 1)."""
    if df < 1:
        return math.nan
    return float(stats.t.ppf(1.0 - (1.0 - confidence) / 2.0, df))


@dataclass(frozen=True)
class Estimate:
    """Mean over seeds with sample std, a t confidence interval and the p-value of mean = 0.

    ``lo``/``hi``/``p`` are nan with fewer than two values (``p`` also when every value is equal).
    """

    mean: float
    std: float
    n: int
    lo: float
    hi: float
    p: float = math.nan
    confidence: float = CONFIDENCE

    @classmethod
    def of(cls, values: Iterable[float | None], confidence: float = CONFIDENCE) -> Estimate:
        x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
        n = int(x.size)
        if n == 0:
            return cls(math.nan, math.nan, 0, math.nan, math.nan, math.nan, confidence)
        mean = float(x.mean())
        if n < 2:
            return cls(mean, math.nan, n, math.nan, math.nan, math.nan, confidence)
        std = float(x.std(ddof=1))
        half = t_quantile(n - 1, confidence) * std / math.sqrt(n)
        p = float(stats.ttest_1samp(x, 0.0).pvalue) if std > 0 else math.nan
        return cls(mean, std, n, mean - half, mean + half, p, confidence)

    def as_dict(self) -> dict[str, float]:
        return {
            "mean": self.mean,
            "std": self.std,
            "n": self.n,
            "ci_lo": self.lo,
            "ci_hi": self.hi,
            "p": self.p,
            "confidence": self.confidence,
        }


def paired_difference(
    a: Mapping[int, float], b: Mapping[int, float], confidence: float = CONFIDENCE
) -> Estimate:
    """Mean of per-seed differences ``a[seed] - b[seed]`` over the seeds both have, with its t interval."""
    seeds = sorted(set(a) & set(b))
    return Estimate.of((a[s] - b[s] for s in seeds), confidence)


def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm step-down adjusted p-values of one family (nan p-values stay nan and do not count)."""
    finite = sorted(((p, k) for k, p in pvalues.items() if math.isfinite(p)), key=lambda t: t[0])
    m = len(finite)
    out = {k: math.nan for k in pvalues}
    running = 0.0
    for i, (p, k) in enumerate(finite):
        running = max(running, min(1.0, (m - i) * p))  # monotone: never below an earlier adjusted value
        out[k] = running
    return out


def across_splits(
    per_split: Mapping[str, Mapping[int, float]],
    reference: Mapping[str, Mapping[int, float]],
    *,
    confidence: float = CONFIDENCE,
) -> dict[str, dict[str, Any]]:
    """One comparison (a method against the reference) on m splits, corrected for the m tests.

    Args:
        per_split: ``{split: {seed: score}}`` of the method.
        reference: the same for the reference method.

    Returns ``{split: {"estimate": 95 % Estimate, "bonferroni": Estimate at 1 - (1 - confidence) / m,
    "p_holm": Holm-adjusted p, "m": m}}`` for the splits both have.
    """
    splits = [s for s in per_split if s in reference]
    m = len(splits)
    plain = {s: paired_difference(per_split[s], reference[s], confidence) for s in splits}
    wide = {
        s: paired_difference(per_split[s], reference[s], 1.0 - (1.0 - confidence) / max(m, 1)) for s in splits
    }
    adjusted = holm({s: e.p for s, e in plain.items()})
    return {s: {"estimate": plain[s], "bonferroni": wide[s], "p_holm": adjusted[s], "m": m} for s in splits}


def crossing_n(
    ns: Sequence[float], values: Sequence[float], target: float
) -> tuple[float | None, float | None]:
    """Where a Dice-vs-N curve first reaches ``target``: (smallest grid N with value >= target, linear
    interpolation in N between the last grid point below and that one). (None, None): never reached."""
    pairs = sorted((float(n), float(v)) for n, v in zip(ns, values, strict=True) if math.isfinite(v))
    for i, (n, v) in enumerate(pairs):
        if v >= target:
            if i == 0:
                return n, n
            n0, v0 = pairs[i - 1]
            return n, n0 + (target - v0) * (n - n0) / (v - v0)
    return None, None


def efficiency_factor(
    curve: Mapping[int, Mapping[int, float]], target: Mapping[int, float], base_n: int
) -> dict[str, Any]:
    """The data-efficiency factor: smallest N at which the reference curve matches ``target`` (the
    other method's Dice at ``base_n``), divided by ``base_n``.

    Args:
        curve: ``{N: {seed: Dice}}`` of the reference method (FedAvg seg-only).
        target: ``{seed: Dice}`` of the compared method at ``base_n`` (FedAvg genseg at N = 9).
        base_n: the compared method's N.

    Returns the factor on the grid and interpolated (``None`` when the curve never reaches the target:
    then ``lower_bound`` = largest N / base_n), per-seed factors (seed-paired), and a percentile
    bootstrap over seeds (``scipy.stats.bootstrap``, 95 %; a draw whose curve never reaches its target
    counts as the lower bound and is counted in ``censored``).
    """
    ns = sorted(curve)
    seeds = sorted(set(target).intersection(*[set(curve[n]) for n in ns])) if ns else []

    def factor(sample: Sequence[int]) -> tuple[float | None, float | None]:
        means = [float(np.mean([curve[n][s] for s in sample])) for n in ns]
        goal = float(np.mean([target[s] for s in sample]))
        grid, interp = crossing_n(ns, means, goal)
        return (None if grid is None else grid / base_n, None if interp is None else interp / base_n)

    out: dict[str, Any] = {
        "base_n": base_n,
        "ns": ns,
        "seeds": seeds,
        "lower_bound": max(ns) / base_n if ns else None,
    }
    if not seeds:
        return out | {"grid": None, "interpolated": None, "per_seed": {}, "bootstrap": None}
    grid, interp = factor(seeds)
    per_seed = {s: factor([s])[1] for s in seeds}
    if len(seeds) < 2:  # nothing to resample
        return out | {"grid": grid, "interpolated": interp, "per_seed": per_seed, "bootstrap": None}

    def statistic(index: np.ndarray) -> np.ndarray:  # a resample of seed positions -> (factor, censored)
        f = factor([seeds[int(i)] for i in index])[1]
        return np.array([out["lower_bound"] if f is None else f, float(f is None)])

    res = stats.bootstrap(
        (np.arange(len(seeds), dtype=float),),
        statistic,
        n_resamples=BOOTSTRAP_RESAMPLES,
        vectorized=False,
        method="percentile",
        confidence_level=CONFIDENCE,
        rng=np.random.default_rng(0),
    )
    boot = {
        "lo": float(res.confidence_interval.low[0]),
        "hi": float(res.confidence_interval.high[0]),
        "draws": int(res.bootstrap_distribution.shape[-1]),
        "censored": int(res.bootstrap_distribution[1].sum()),
        "method": "percentile bootstrap over seeds (scipy.stats.bootstrap)",
    }
    return out | {"grid": grid, "interpolated": interp, "per_seed": per_seed, "bootstrap": boot}
