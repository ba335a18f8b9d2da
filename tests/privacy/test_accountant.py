"""The site accountant against Opacus' own RDPAccountant, composition, calibration, persistence."""

from __future__ import annotations

import copy
import math

import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from genseg_fed.privacy.accountant import Mechanism, SiteAccountant, calibrate_noise, epsilon_of

DELTA = 1e-5
DISC = Mechanism("disc", 1.2, 4 / 9, clip=1.0, sensitivity=1.0)
GEN = Mechanism("gen", 1.2, 4 / 9, clip=2.0, sensitivity=2.0)
SEG = Mechanism("seg", 1.2, 4 / 9, clip=1.0, sensitivity=1.0)
HYPER = Mechanism("hyper", 3.0, 1.0, clip=0.1, sensitivity=0.2)


def _schedule(iterations: int, hyper_every: int = 2) -> list[Mechanism]:
    """The order in which a genseg site releases: I (disc, gen), III (every k), II (seg)."""
    out = []
    for i in range(iterations):
        out += [DISC, GEN] + ([HYPER] if i % hyper_every == 0 else []) + [SEG]
    return out


@pytest.mark.parametrize("iterations", [1, 7, 40])
def test_epsilon_matches_opacus_rdp_accountant_stepped_in_release_order(iterations: int) -> None:
    ours, theirs = SiteAccountant(delta=DELTA), RDPAccountant()
    for m in _schedule(iterations):
        ours.step(m)
        theirs.step(noise_multiplier=m.noise_multiplier, sample_rate=m.sample_rate)
    assert ours.epsilon() == pytest.approx(theirs.get_epsilon(DELTA), abs=1e-3)
    assert ours.epsilon() == pytest.approx(ours.opacus_accountant().get_epsilon(DELTA), abs=1e-9)


def test_published_dp_sgd_value_via_opacus_calibration() -> None:
    # Opacus' own calibration and our epsilon agree on the schedule it calibrated for.
    sigma = get_noise_multiplier(target_epsilon=3.0, target_delta=DELTA, sample_rate=0.01, steps=1000)
    assert epsilon_of([(sigma, 0.01, 1000)], DELTA) == pytest.approx(3.0, abs=0.02)


def test_composed_epsilon_exceeds_every_single_level() -> None:
    acc = SiteAccountant(delta=DELTA)
    for m in _schedule(20):
        acc.step(m)
    alone = acc.epsilon_by_mechanism()
    assert set(alone) == {"disc", "gen", "hyper", "seg"}
    assert all(acc.epsilon() > e > 0 for e in alone.values())
    # levels: I = disc + gen together, II = seg, III = hyper
    level1 = epsilon_of([(DISC.noise_multiplier, DISC.sample_rate, 40)], DELTA)
    assert acc.epsilon() > max(level1, alone["seg"], alone["hyper"])


def test_no_noise_means_infinite_epsilon_and_no_release_means_zero() -> None:
    acc = SiteAccountant(delta=DELTA)
    assert acc.epsilon() == 0.0
    acc.step(Mechanism("seg", 0.0, 0.5, clip=1.0, sensitivity=1.0))
    assert math.isinf(acc.epsilon())


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_calibration_meets_the_target_tightly(target: float) -> None:
    schedule = ((1.0, 0.5, 30), (1.0, 0.5, 30), (2.0, 1.0, 10))
    s = calibrate_noise(target_epsilon=target, delta=DELTA, schedule=schedule)
    eps = epsilon_of([(r * s, q, c) for r, q, c in schedule], DELTA)
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
