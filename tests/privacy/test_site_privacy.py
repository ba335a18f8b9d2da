"""A private site's on-disk safeguards: exact replays, refused re-releases, a lost ledger."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from genseg_fed.config import PrivacyConfig, load_config
from genseg_fed.fed.site import SiteSession
from genseg_fed.fed.weights import shared_weights
from genseg_fed.mlo.trainer import build_networks

_spec = importlib.util.spec_from_file_location("_privacy_conftest", Path(__file__).with_name("conftest.py"))
_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conftest)


@pytest.fixture
def session_and_weights(tmp_path: Path):
    path = _conftest.write_tiny_experiment(tmp_path, sites=1, heldout=0, overrides={"mlo.mode": "seg-only"})
    cfg = load_config(path)
    cfg = dataclasses.replace(cfg, privacy=PrivacyConfig(enabled=True, epsilon=5.0))
    torch.manual_seed(0)
    nets = build_networks(cfg.model, channels=1, image_size=cfg.data.image_size, mode="seg-only")
    weights = shared_weights(nets.parts(), cfg.federation.share)

    def session() -> SiteSession:  # a new ClientApp process per message
        return SiteSession(cfg, cfg.data.sites[0], "train", tmp_path / "state", run_key="run")

    return session, weights


def test_a_replayed_round_releases_exactly_the_same_weights(session_and_weights) -> None:
    session, weights = session_and_weights
    first, m1 = session().train_round(weights, server_round=1, iterations=1)
    again, m2 = session().train_round(weights, server_round=1, iterations=1)
    assert m1["dp-epsilon"] == m2["dp-epsilon"] > 0
    for k in first:
        np.testing.assert_array_equal(first[k], again[k], err_msg=k)


def test_a_round_is_not_trained_again_from_different_weights(session_and_weights) -> None:
    session, weights = session_and_weights
    session().train_round(weights, server_round=1, iterations=1)
    other = {k: v + 0.01 for k, v in weights.items()}
    with pytest.raises(RuntimeError, match="already trained and released from different global weights"):
        session().train_round(other, server_round=1, iterations=1)


def test_a_site_that_lost_its_ledger_refuses_to_train(session_and_weights) -> None:
    session, weights = session_and_weights
    s = session()
    s.train_round(weights, server_round=1, iterations=1)
    (s.dir / "round-0001.pt").unlink()
    with pytest.raises(RuntimeError, match="ledger after round 1 is missing"):
        session().train_round(weights, server_round=2, iterations=1)


def test_the_noise_seed_is_secret_per_site_not_derived_from_the_config(tmp_path: Path) -> None:
    from genseg_fed.privacy.site import ReleaseLog

    seeds = {ReleaseLog(tmp_path / f"site{i}" / "privacy.json").seed for i in range(3)}
    assert len(seeds) == 3, "each site draws its own seed from the OS"
    again = ReleaseLog(tmp_path / "site0" / "privacy.json").seed
    assert again in seeds, "and keeps it, so that a replayed round reuses exactly the same noise"
