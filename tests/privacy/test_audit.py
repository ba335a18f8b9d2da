"""The one-run privacy audit: its statistics against the binomial, and a non-private run failing it."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from genseg_fed.privacy.audit import epsilon_lower_bound, p_value, run_canary_audit


def test_p_value_without_delta_is_the_binomial_tail_of_randomised_response() -> None:
    q = 1 / (1 + math.exp(-1.0))
    assert p_value(100, 50, 40, 1.0, 0.0) == pytest.approx(stats.binom.sf(39, 50, q))
    assert p_value(100, 50, 40, 1.0, 1e-3) > p_value(100, 50, 40, 1.0, 0.0)  # delta only weakens it


@pytest.mark.parametrize(
    ("m", "v", "low", "high"), [(64, 64, 2.9, 3.1), (256, 256, 4.3, 4.6), (64, 32, 0, 0)]
)
def test_lower_bound_of_perfect_and_of_chance_guessing(m: int, v: int, low: float, high: float) -> None:
    eps = epsilon_lower_bound(m, m, v, delta=1e-5)
    assert low <= eps <= high
    if eps > 0:  # the bound is where the p-value crosses 0.05
        assert p_value(m, m, v, eps * 0.99, 1e-5) < 0.05 <= p_value(m, m, v, eps * 1.01, 1e-5)


@pytest.mark.slow
def test_a_non_private_run_fails_the_audit_and_a_private_run_passes() -> None:
    """64 canaries: without DP every coin is recovered (lower bound ~3 > the claim 2); with DP at
    epsilon 2 the lower bound stays below the epsilon the run reports."""
    plain = run_canary_audit(epsilon=None, canaries=64, steps=150)
    assert plain["correct"] >= 60 and plain["epsilon_lower"] > 2.0
    private = run_canary_audit(epsilon=2.0, canaries=64, steps=150, noise_seed=3)
    assert private["epsilon_reported"] <= 2.0 + 1e-9
    assert private["epsilon_lower"] <= private["epsilon_reported"]
