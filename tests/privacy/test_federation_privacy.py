"""Private sites in the in-process federation: budgets, declines, metrics, report, central DP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from genseg_fed.checkpoint import load_checkpoint
from genseg_fed.config import PrivacyConfig
from genseg_fed.fed.protocol import record_to_weights
from genseg_fed.fed.runconfig import experiment_config
from genseg_fed.privacy import epsilon_of
from server.federation import run_federation

SIGMA = 2.0  # fixed noise multiplier (no calibration) so the budget arithmetic below is exact


def _federation(make, privacy: dict, **overrides: object):
    """``tiny_federation`` with a ``privacy`` section added to its experiment file."""
    _, grid, out = make(overrides=overrides)
    path = Path(grid.run_config["config"])
    cfg = yaml.safe_load(path.read_text())
    cfg["privacy"] = privacy
    path.write_text(yaml.safe_dump(cfg))
    return grid, out


def _run(grid, out: Path) -> Path:
    return run_federation(grid, experiment_config(grid.run_config), out, site_state_dir=out / "sites")


def _epsilon_after(iterations: int, *, q: float, delta: float) -> float:
    """genseg, hyper_every=1: per iteration disc, gen, seg (rate q) and one level-III release (rate 1);
    replace-one: z = sigma / 2 for every mechanism."""
    return epsilon_of([(SIGMA / 2, q, 3 * iterations), (SIGMA / 2, 1.0, iterations)], delta)


def test_a_site_whose_budget_is_spent_declines_and_sends_no_more_weights(tiny_federation) -> None:
    q, delta = 2 / 4, 1e-5  # tiny sites: 4 training records, batch 2
    one, two = _epsilon_after(1, q=q, delta=delta), _epsilon_after(2, q=q, delta=delta)
    budget_b = 0.5 * (one + two)  # enough for round 1 only
    privacy = {
        "enabled": True,
        "noise_multiplier": SIGMA,
        "epsilon": 100.0,
        "delta": delta,
        "sites": [{"name": "site-b", "epsilon": budget_b}],
    }
    per_step = {"mlo.pretrain_iterations": 0, "mlo.gen_every": 1, "mlo.hyper_every": 1}  # as _epsilon_after
    grid, out = _federation(
        tiny_federation, privacy, **{"federation.rounds": 3, "federation.local_iterations": 1, **per_step}
    )
    _run(grid, out)
    metrics = json.loads((out / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [sorted(r["train"]) for r in rounds] == [["site-a", "site-b"], ["site-a"], ["site-a"]]
    assert all(r["aggregated"] for r in rounds), "the others are aggregated without the declining site"
    assert [sorted(r.get("declined", {})) for r in rounds] == [[], ["site-b"], ["site-b"]]
    assert all(r["failures"] == [] for r in rounds), "a decline is not a failure"

    # site-b sent weights once, then only scalar replies flagged 'declined'
    trains_b = [rep for node, rep in grid.sent if node == 101 and rep.metadata.message_type == "train"]
    assert [bool(rep.content.array_records) for rep in trains_b] == [True, False, False]
    for rep in trains_b[1:]:
        (record,) = rep.content.metric_records.values()
        assert record["declined"] == 1.0 and record["dp-epsilon"] <= budget_b

    site_b = metrics["privacy"]["sites"]["site-b"]["rounds"]
    assert [r["status"] for r in site_b] == [
        "trained",
        "declined: privacy budget spent",
        "declined: privacy budget spent",
    ]
    assert site_b[0]["epsilon"] == pytest.approx(one, rel=1e-6)
    assert all(r["epsilon"] == pytest.approx(one, rel=1e-6) for r in site_b), "no spending after the decline"

    # site-a's accountant survives each round's new ClientApp session: epsilon composes over rounds
    site_a = metrics["privacy"]["sites"]["site-a"]["rounds"]
    expected = [_epsilon_after(i, q=q, delta=delta) for i in (1, 2, 3)]
    assert [r["epsilon"] for r in site_a] == pytest.approx(expected, rel=1e-6)
    assert all(r["noise-seg"] == SIGMA and r["clip-hyper"] == PrivacyConfig().clip_hyper for r in site_a)

    report = (out / "report.md").read_text()
    assert "## Privacy" in report and "declined: privacy budget spent" in report
    assert (out / "epsilon_per_round.png").is_file()
    # no local-only baselines under sample-level DP: each site declined to send one
    cross = metrics["crosssite"]
    assert cross["models"] == ["global"]
    assert {f["site"] for f in cross["failures"]} == {"site-a", "site-b"}


def test_calibrated_sites_spend_their_budget_exactly_over_the_planned_rounds(tiny_federation) -> None:
    privacy = {"enabled": True, "epsilon": 8.0, "sites": [{"name": "site-b", "epsilon": 3.0}]}
    grid, out = _federation(
        tiny_federation, privacy, **{"federation.baselines": False, "mlo.mode": "seg-only"}
    )
    _run(grid, out)
    sites = json.loads((out / "metrics.json").read_text())["privacy"]["sites"]
    for name, target in (("site-a", 8.0), ("site-b", 3.0)):
        eps = [r["epsilon"] for r in sites[name]["rounds"]]
        assert eps[0] < eps[1] <= target and eps[1] == pytest.approx(target, rel=0.02)
    assert sites["site-b"]["rounds"][0]["noise-seg"] > sites["site-a"]["rounds"][0]["noise-seg"]


@pytest.mark.parametrize("mode", ["server", "client"])
def test_central_dp_clips_each_site_update_and_accounts_the_rounds(tiny_federation, mode: str) -> None:
    clip = 0.05
    privacy = {"central": mode, "central_clip": clip, "central_noise_multiplier": 1.0}
    grid, out = _federation(
        tiny_federation,
        privacy,
        **{
            "federation.baselines": False,
            "federation.rounds": 2,
            "federation.local_iterations": 1,
            "mlo.mode": "seg-only",
        },
    )
    _run(grid, out)
    metrics = json.loads((out / "metrics.json").read_text())
    central = metrics["privacy"]["central"]
    assert central["releases"] == 2 and central["noise_multiplier"] == 1.0 and central["clip"] == clip
    eps = [r["epsilon"] for r in central["rounds"]]
    assert 0 < eps[0] < eps[1] == pytest.approx(central["epsilon"])
    assert all(r["aggregated"] for r in metrics["rounds"])
    if mode == "client":  # the site clipped its own update before sending it
        first = load_checkpoint(out / "checkpoint.pt")["initial"]
        (rep,) = [r for n, r in grid.sent if n == 100 and r.metadata.message_type == "train"][:1]
        sent = record_to_weights(rep.content.array_records["arrays"])
        norm = np.sqrt(sum(float(np.sum((sent[k] - first[k]) ** 2)) for k in sent))
        assert norm <= clip * (1 + 1e-4)
    assert "Client-level DP" in (out / "report.md").read_text()
