"""The replace-one site accountant against independent computations, composition, calibration, persistence.

Independent of ``dp_accounting`` and Opacus: the exact privacy profile of the Gaussian mechanism by numerical
integration (scipy quadrature), and a numerical privacy-loss distribution (PLD) of one concrete pair of
neighbouring datasets, composed by FFT, which lower-bounds the true epsilon of the sampled mechanism.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from scipy import integrate, optimize, stats

from genseg_fed.privacy.accountant import Mechanism, SiteAccountant, calibrate_noise, epsilon_of

DELTA = 1e-5
DISC = Mechanism("disc", 2.4, 4 / 9, clip=1.0, sensitivity=2.0)
GEN = Mechanism("gen", 2.4, 4 / 9, clip=2.0, sensitivity=4.0)
SEG = Mechanism("seg", 2.4, 4 / 9, clip=1.0, sensitivity=2.0)
HYPER = Mechanism("hyper", 6.0, 1.0, clip=0.1, sensitivity=0.2)


def _schedule(iterations: int, hyper_every: int = 2) -> list[Mechanism]:
    """The order in which a genseg site releases: I (disc, gen), III (every k), II (seg)."""
    out = []
    for i in range(iterations):
        out += [DISC, GEN] + ([HYPER] if i % hyper_every == 0 else []) + [SEG]
    return out


# ----------------------------------------------------------------------------- independent references


def _gaussian_delta_by_quadrature(mu: float, eps: float) -> float:
    """delta(eps) of N(mu, 1) against N(0, 1): integral of max(0, p - e^eps q), by quadrature."""
    cut = eps / mu + mu / 2  # where p = e^eps q

    def integrand(x: float) -> float:
        return stats.norm.pdf(x - mu) - math.exp(eps) * stats.norm.pdf(x)

    value, _ = integrate.quad(integrand, cut, cut + 40.0, epsabs=1e-14, epsrel=1e-10, limit=200)
    return value


def _gaussian_epsilon_by_quadrature(mu: float, delta: float) -> float:
    return optimize.brentq(lambda e: _gaussian_delta_by_quadrature(mu, e) - delta, 1e-6, 200.0, xtol=1e-10)


def _pld_epsilon_lower_bound(*, sigma: float, q: float, steps: int, delta: float) -> float:
    """Epsilon of one concrete neighbouring pair, composed ``steps`` times: a LOWER bound on the truth.

    One patient's clipped gradient is +e (dataset D) or -e (D'), every other patient's is 0; with a
    sample that holds the patient with probability q, one release is (1-q) N(0, s^2) + q N(+-1, s^2)
    along e (s = sigma x clip, clip 1). Privacy losses are rounded DOWN onto a grid (so the computed
    delta, hence epsilon, can only be too small) and composed by FFT.
    """
    y = np.linspace(-12 * sigma - 2, 12 * sigma + 2, 200_001)
    p = (1 - q) * stats.norm.pdf(y, 0, sigma) + q * stats.norm.pdf(y, 1, sigma)
    r = (1 - q) * stats.norm.pdf(y, 0, sigma) + q * stats.norm.pdf(y, -1, sigma)
    mass = p / p.sum()
    loss = np.log(p) - np.log(r)
    h = 1e-3
    idx = np.floor(loss / h).astype(np.int64)
    lo = idx.min()
    pmf = np.bincount(idx - lo, weights=mass)
    size = 1 << math.ceil(math.log2(len(pmf) * steps + 1))
    composed = np.fft.irfft(np.fft.rfft(pmf, size) ** steps, size)[: (len(pmf) - 1) * steps + 1]
    composed = np.clip(composed, 0.0, None)
    grid = (np.arange(len(composed)) + lo * steps) * h

    def delta_at(eps: float) -> float:
        above = grid > eps
        return float(np.sum(composed[above] * (1.0 - np.exp(eps - grid[above]))))

    if delta_at(0.0) <= delta:
        return 0.0
    return optimize.brentq(lambda e: delta_at(e) - delta, 0.0, float(grid.max()), xtol=1e-6)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    ("releases", "target_delta"),
    [([(2.0, 1)], 1e-5), ([(3.0, 40)], 1e-5), ([(1.5, 10), (4.0, 25)], 1e-6)],
)
def test_unsampled_releases_compose_to_the_exact_gaussian_profile(releases, target_delta) -> None:
    """q = 1 everywhere: epsilon equals the exact profile of one Gaussian with mu^2 = sum count / z^2."""
    mu = math.sqrt(sum(c / (z * z) for z, c in releases))
    want = _gaussian_epsilon_by_quadrature(mu, target_delta)
    got = epsilon_of([(z, 1.0, c) for z, c in releases], target_delta)
    assert got == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize(("sigma", "q", "steps"), [(2.0, 4 / 9, 30), (3.0, 0.08, 150), (1.5, 0.5, 10)])
def test_sampled_epsilon_is_never_below_a_numerical_pld_of_a_neighbouring_pair(sigma, q, steps) -> None:
    """The accountant's epsilon (RDP bound, WOR, replace-one) must upper-bound the epsilon that one
    concrete pair of neighbouring datasets provably reaches; it should not be wildly loose either."""
    lower = _pld_epsilon_lower_bound(sigma=sigma, q=q, steps=steps, delta=DELTA)
    seg = Mechanism("seg", sigma, q, clip=1.0, sensitivity=2.0)
    acc = SiteAccountant(delta=DELTA)
    acc.step(seg, steps)
    assert acc.epsilon() >= lower > 0
    assert acc.epsilon() <= 3.0 * lower + 1.0


def test_replace_one_costs_more_than_the_old_add_remove_accounting() -> None:
    """The same noise spends more under replace-one (sensitivity 2C) than Opacus' add/remove RDP said."""
    from opacus.accountants import RDPAccountant

    old = RDPAccountant()
    old.history = [(SEG.noise_multiplier, SEG.sample_rate, 50)]
    acc = SiteAccountant(delta=DELTA)
    acc.step(SEG, 50)
    assert acc.epsilon() > 1.5 * old.get_epsilon(DELTA)


def test_composed_epsilon_exceeds_every_single_level() -> None:
    acc = SiteAccountant(delta=DELTA)
    for m in _schedule(20):
        acc.step(m)
    alone = acc.epsilon_by_mechanism()
    assert set(alone) == {"disc", "gen", "hyper", "seg"}
    assert all(acc.epsilon() > e > 0 for e in alone.values())


def test_no_noise_means_infinite_epsilon_and_no_release_means_zero() -> None:
    acc = SiteAccountant(delta=DELTA)
    assert acc.epsilon() == 0.0
    acc.step(Mechanism("seg", 0.0, 0.5, clip=1.0, sensitivity=2.0))
    assert math.isinf(acc.epsilon())


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_calibration_meets_the_target_tightly(target: float) -> None:
    schedule = ((1.0, 0.5, 30), (1.0, 0.5, 30), (2.0, 1.0, 10))
    s = calibrate_noise(target_epsilon=target, delta=DELTA, schedule=schedule)
    eps = epsilon_of([(r * s / 2, q, c) for r, q, c in schedule], DELTA)
    assert eps <= target and eps == pytest.approx(target, rel=0.02)
    assert calibrate_noise(target_epsilon=math.inf, delta=DELTA, schedule=schedule) == 0.0


def test_state_survives_a_restart_and_keeps_composing() -> None:
    a = SiteAccountant(delta=DELTA)
    for m in _schedule(5):
        a.step(m)
    state = copy.deepcopy(a.state_dict())
    b = SiteAccountant(delta=0.5)
    b.load_state_dict(state)
    assert b.delta == DELTA and b.epsilon() == a.epsilon() and b.history == a.history
    for m in _schedule(3):
        a.step(m)
        b.step(m)
    assert b.epsilon() == a.epsilon() > SiteAccountant(delta=DELTA).epsilon_after({SEG: 1})


def test_a_ledger_of_the_old_add_remove_accounting_is_refused() -> None:
    old = {"delta": DELTA, "history": [{**vars(SEG), "steps": 3}]}
    with pytest.raises(ValueError, match="neighbouring relation"):
        SiteAccountant(delta=DELTA).load_state_dict(old)


def test_planned_releases_are_not_recorded() -> None:
    acc = SiteAccountant(delta=DELTA)
    acc.step(SEG, 3)
    before = acc.epsilon()
    assert acc.epsilon_after({SEG: 5}) > before == acc.epsilon()
    assert acc.steps("seg") == 3


@pytest.mark.parametrize(
    ("privacy", "message"),
    [
        ({"enabled": True, "sites": [{"name": "nowhere", "epsilon": 1.0}]}, "not training sites"),
        ({"enabled": True, "clip_seg": 0.0}, "clipping norms must be > 0"),
        ({"enabled": True, "sites": [{"name": "hospital-a", "epsilon": 0.0}]}, "epsilon must be > 0"),
        ({"enabled": True, "level3_noise_ratio": 0.0}, "level3_noise_ratio"),
        ({"central": "server"}, None),
    ],
)
def test_privacy_config_is_validated(privacy: dict, message: str | None) -> None:
    from genseg_fed.config import ConfigError, parse_config

    if message is None:
        assert parse_config({"privacy": privacy}).privacy.central == "server"
        with pytest.raises(ConfigError, match="fedavg or fedprox"):
            parse_config({"privacy": privacy, "federation": {"strategy": "fedadam"}})
        return
    with pytest.raises(ConfigError, match=message):
        parse_config({"privacy": privacy})


def test_per_site_budget_overrides_the_default() -> None:
    from genseg_fed.config import parse_config

    cfg = parse_config(
        {"privacy": {"enabled": True, "epsilon": 8, "sites": [{"name": "hospital-b", "epsilon": 2}]}}
    )
    assert cfg.privacy.budget("hospital-b") == (2.0, 1e-5)
    assert cfg.privacy.budget("hospital-a") == (8.0, 1e-5)
