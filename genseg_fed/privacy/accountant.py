"""One privacy ledger per site: every Gaussian release it makes, composed under replace-one adjacency.

**Neighbouring relation: replace one patient.** A site's training split holds a fixed, public number n of
patients (``data.n_train``; the count is sent to the coordinator), so the only change that can happen to
it is that one patient's data is replaced by another's. Every mechanism is analysed for that relation
(docs/privacy.md, section 2):

* a DP-SGD step sums per-patient gradients clipped to C over a **fixed-size sample of B patients drawn
  without replacement** (sampling rate q = B / n); replacing one patient moves the sum by at most 2C, so
  the replace-one sensitivity is 2C and the noise multiplier the analysis needs is
  ``z = noise std / (2C) = sigma / 2`` (sigma: Opacus' noise multiplier, noise std / C);
* the level-III update is one vector clipped to C (sensitivity 2C as well), released with no sampling.

Rényi DP of the sampled Gaussian mechanism without replacement under replace-one is bounded by Wang, Balle
and Kasiviswanathan (AISTATS 2019, Theorem 27 of arXiv:1808.00087), as implemented in Google's
``dp_accounting``; RDP composes additively under adaptive composition, and the total is converted to
(epsilon, delta) by ``dp_accounting``'s conversion. When no release is sampled (q = 1 everywhere) the
composition is exactly one Gaussian mechanism with ``1/z^2 = sum_k count_k / z_k^2`` and epsilon comes from
the exact (analytic) Gaussian privacy profile instead (Balle and Wang 2018), which is tight.

A *mechanism* is one kind of release with its noise multiplier, sampling rate, clipping norm and
sensitivity; the ledger counts how many times each ran (RDP does not depend on the order of releases).
:func:`calibrate_noise` finds the smallest noise whose planned schedule stays within a target.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting.rdp import compute_epsilon

__all__ = [
    "ORDERS",
    "SENSITIVITY_FACTOR",
    "Mechanism",
    "SiteAccountant",
    "calibrate_noise",
    "epsilon_of",
]

# RDP orders. For the budgets used here (epsilon 0.5-20, delta 1e-5..1e-7) the best order lies well inside
# this range; a smaller set only loosens (never invalidates) the bound, and keeps calibration fast.
ORDERS = tuple(float(a) for a in (*range(2, 33), 40, 48, 64))
SENSITIVITY_FACTOR = 2.0  # replace-one: a released sum or vector moves by at most 2 x its clipping norm


@dataclass(frozen=True)
class Mechanism:
    """One kind of Gaussian release.

    name: what it updates (``disc``, ``gen``, ``seg``, ``hyper``).
    noise_multiplier: noise std divided by ``clip`` (Opacus' convention; 0: no noise, infinite epsilon).
    sample_rate: B / n, the fraction of the n patients in each fixed-size sample drawn without
        replacement (1.0: every record, no amplification claimed).
    clip: the clipping norm C of each per-patient gradient (or of the whole released vector).
    sensitivity: L2 sensitivity of the released sum / vector to replacing one patient (2C).
    """

    name: str
    noise_multiplier: float
    sample_rate: float
    clip: float
    sensitivity: float

    @property
    def noise_std(self) -> float:
        """Standard deviation of the Gaussian noise added to the released sum/vector."""
        return self.noise_multiplier * self.clip

    @property
    def z(self) -> float:
        """Noise std over sensitivity: the Gaussian mechanism's parameter in the analysis."""
        return self.noise_std / self.sensitivity if self.sensitivity > 0 else math.inf


@functools.lru_cache(maxsize=4096)
def _rdp_one_step(sample_rate: float, z: float) -> tuple[float, ...]:
    """RDP at :data:`ORDERS` of one Gaussian release (noise/sensitivity ``z``) on a WOR sample of rate q."""
    if z <= 0:
        return tuple(math.inf for _ in ORDERS)
    from dp_accounting.rdp import rdp_privacy_accountant as rdp  # the WBK bound has no public wrapper

    if sample_rate >= 1.0:
        return tuple(a / (2.0 * z * z) for a in ORDERS)
    return tuple(float(v) for v in rdp._compute_rdp_sample_wor_gaussian(sample_rate, z, list(ORDERS)))


def epsilon_of(steps: Iterable[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of composing ``(z, sample_rate, count)`` releases under replace-one, at ``delta``.

    ``z`` is noise std / replace-one sensitivity. Unsampled-only schedules use the exact Gaussian profile.
    """
    steps = [(float(z), float(q), int(c)) for z, q, c in steps if c > 0]
    if not steps:
        return 0.0
    if any(z <= 0 for z, _, _ in steps):
        return math.inf
    if all(q >= 1.0 for _, q, _ in steps):
        # Composition of Gaussian mechanisms is one Gaussian mechanism: sum of (1/z)^2.
        z_total = 1.0 / math.sqrt(sum(c / (z * z) for z, _, c in steps))
        return float(dp_accounting.get_epsilon_gaussian(z_total, delta))
    total = np.zeros(len(ORDERS))
    for z, q, count in steps:
        total = total + count * np.asarray(_rdp_one_step(min(q, 1.0), z))
    if not np.isfinite(total).any():
        return math.inf
    eps, _ = compute_epsilon(list(ORDERS), total.tolist(), delta)
    return float(eps)


class SiteAccountant:
    """Composes every mechanism one site runs, at that site's ``delta``.

    Example::

        acc = SiteAccountant(delta=1e-5)
        acc.step(Mechanism("seg", 2.0, 4 / 50, clip=1.0, sensitivity=2.0))
        acc.epsilon()
    """

    def __init__(self, *, delta: float) -> None:
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.delta = delta
        self._counts: dict[Mechanism, int] = {}

    def step(self, mechanism: Mechanism, count: int = 1) -> None:
        """Record ``count`` releases of ``mechanism``."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        if count:
            self._counts[mechanism] = self._counts.get(mechanism, 0) + count

    @property
    def history(self) -> list[tuple[Mechanism, int]]:
        """Every mechanism and how many times it ran."""
        return list(self._counts.items())

    def steps(self, name: str | None = None) -> int:
        """Releases recorded (of mechanism ``name``, or of all)."""
        return sum(c for m, c in self._counts.items() if name is None or m.name == name)

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far at ``delta`` (the site's delta by default)."""
        return self.epsilon_after({}, delta=delta)

    def epsilon_after(self, planned: Mapping[Mechanism, int], *, delta: float | None = None) -> float:
        """Epsilon after the recorded releases plus ``planned`` ones (nothing is recorded)."""
        counts = dict(self._counts)
        for m, c in planned.items():
            counts[m] = counts.get(m, 0) + c
        steps = [(m.z, m.sample_rate, c) for m, c in counts.items()]
        return epsilon_of(steps, self.delta if delta is None else delta)

    def epsilon_by_mechanism(self) -> dict[str, float]:
        """Epsilon each mechanism would have spent alone (its share of the composed total)."""
        names = sorted({m.name for m in self._counts})
        return {
            n: epsilon_of(
                [(m.z, m.sample_rate, c) for m, c in self._counts.items() if m.name == n], self.delta
            )
            for n in names
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (survives ``torch.save`` / JSON)."""
        return {
            "delta": self.delta,
            "relation": "replace-one",
            "history": [{**asdict(m), "steps": c} for m, c in self._counts.items()],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (replaces the current ledger)."""
        if state.get("relation") != "replace-one":
            raise ValueError(
                "this privacy ledger was written under another neighbouring relation (add/remove, before "
                "replace-one accounting); its epsilon cannot be continued. Start a new run."
            )
        self.delta = float(state["delta"])
        self._counts = {}
        for entry in state["history"]:
            entry = dict(entry)
            steps = int(entry.pop("steps"))
            self.step(Mechanism(**entry), steps)


@functools.lru_cache(maxsize=256)
def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    schedule: tuple[tuple[float, float, int], ...],
    rel_tol: float = 5e-3,
) -> float:
    """Smallest noise multiplier scale ``s`` whose schedule stays within ``(target_epsilon, delta)``.

    Args:
        schedule: ``(ratio, sample_rate, count)`` per mechanism; mechanism ``k`` gets the noise
            multiplier (noise std / clip) ``ratio_k * s``, i.e. ``z_k = ratio_k * s / 2`` (replace-one).
        rel_tol: relative precision of ``s`` (the result always satisfies the target).

    Returns ``0.0`` for an infinite target (no noise) and raises ``ValueError`` if even a huge
    noise cannot meet the target.
    """
    if math.isinf(target_epsilon):
        return 0.0
    if target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")

    def eps(s: float) -> float:
        return epsilon_of([(r * s / SENSITIVITY_FACTOR, q, c) for r, q, c in schedule], delta)

    lo, hi = 0.0, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(f"epsilon={target_epsilon} at delta={delta} is out of reach for this schedule")
    while hi - lo > rel_tol * hi:
        mid = 0.5 * (lo + hi)
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi
