"""One privacy ledger per site: every Gaussian release it makes, composed by Opacus' RDP analysis.

A *mechanism* is one kind of release (a discriminator DP-SGD step, a level-III update ...) with its
noise multiplier (noise std / L2 sensitivity), its Poisson sampling rate (1.0: no amplification)
and the clipping norm and sensitivity it was calibrated to. The ledger counts how many times each
mechanism ran. Rényi DP composes additively and does not depend on the order of the releases, so
these counts are all an accountant needs; epsilon is computed by Opacus' own
:class:`~opacus.accountants.RDPAccountant` from the ledger.

:func:`calibrate_noise` finds the smallest noise multiplier whose planned schedule stays within a
target ``(epsilon, delta)`` (binary search on the composed epsilon).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

__all__ = ["Mechanism", "SiteAccountant", "calibrate_noise", "epsilon_of"]

_ORDERS = tuple(RDPAccountant.DEFAULT_ALPHAS)


@dataclass(frozen=True)
class Mechanism:
    """One kind of Gaussian release.

    name: what it updates (``disc``, ``gen``, ``seg``, ``hyper``).
    noise_multiplier: noise std divided by ``sensitivity`` (0: no noise, epsilon is infinite).
    sample_rate: Poisson sampling rate q of the records it reads (1.0: every record, no
        amplification claimed).
    clip: the clipping norm C of what is summed or released.
    sensitivity: L2 sensitivity of the released quantity to adding or removing one record
        (C for a sum of per-record clipped gradients, 2C for a whole clipped update).
    """

    name: str
    noise_multiplier: float
    sample_rate: float
    clip: float
    sensitivity: float

    @property
    def noise_std(self) -> float:
        """Standard deviation of the Gaussian noise added to the released sum/vector."""
        return self.noise_multiplier * self.sensitivity


@functools.lru_cache(maxsize=4096)
def _rdp_one_step(sample_rate: float, noise_multiplier: float) -> tuple[float, ...]:
    if noise_multiplier <= 0:
        return tuple(math.inf for _ in _ORDERS)
    rdp = rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(_ORDERS)
    )
    return tuple(float(v) for v in rdp)


def epsilon_of(steps: Iterable[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of composing ``(noise_multiplier, sample_rate, count)`` releases, at ``delta``.

    Same analysis and orders as Opacus' ``RDPAccountant`` (RDP of the sampled Gaussian mechanism,
    summed over releases, converted with Balle et al. 2020), with the per-release RDP cached.
    """
    total = np.zeros(len(_ORDERS))
    any_step = False
    for sigma, q, count in steps:
        if count <= 0:
            continue
        any_step = True
        total = total + count * np.asarray(_rdp_one_step(float(q), float(sigma)))
    if not any_step:
        return 0.0
    if not np.isfinite(total).any():
        return math.inf
    eps, _ = rdp_analysis.get_privacy_spent(orders=list(_ORDERS), rdp=total, delta=delta)
    return float(eps)


class SiteAccountant:
    """Composes every mechanism one site runs, at that site's ``delta``.

    Example::

        acc = SiteAccountant(delta=1e-5)
        acc.step(Mechanism("seg", 1.1, 4 / 9, clip=1.0, sensitivity=1.0))
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
        steps = [(m.noise_multiplier, m.sample_rate, c) for m, c in counts.items()]
        return epsilon_of(steps, self.delta if delta is None else delta)

    def epsilon_by_mechanism(self) -> dict[str, float]:
        """Epsilon each mechanism would have spent alone (its share of the composed total)."""
        names = sorted({m.name for m in self._counts})
        return {
            n: epsilon_of(
                [(m.noise_multiplier, m.sample_rate, c) for m, c in self._counts.items() if m.name == n],
                self.delta,
            )
            for n in names
        }

    def opacus_accountant(self) -> RDPAccountant:
        """The same ledger as an Opacus ``RDPAccountant`` (for cross-checks)."""
        acc = RDPAccountant()
        acc.history = [(m.noise_multiplier, m.sample_rate, c) for m, c in self._counts.items()]
        return acc

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (survives ``torch.save`` / JSON)."""
        return {"delta": self.delta, "history": [{**asdict(m), "steps": c} for m, c in self._counts.items()]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (replaces the current ledger)."""
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
    """Smallest noise scale ``s`` whose schedule stays within ``(target_epsilon, delta)``.

    Args:
        schedule: ``(ratio, sample_rate, count)`` per mechanism; mechanism ``k`` gets the noise
            multiplier ``ratio_k * s``.
        rel_tol: relative precision of ``s`` (the result always satisfies the target).

    Returns ``0.0`` for an infinite target (no noise) and raises ``ValueError`` if even a huge
    noise cannot meet the target.
    """
    if math.isinf(target_epsilon):
        return 0.0
    if target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")

    def eps(s: float) -> float:
        return epsilon_of([(r * s, q, c) for r, q, c in schedule], delta)

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
