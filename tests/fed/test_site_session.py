"""SiteSession: what one training round replies, whatever levels ran in it."""

from __future__ import annotations

from pathlib import Path

import torch

from genseg_fed.config import load_config
from genseg_fed.fed.site import SiteSession
from genseg_fed.fed.weights import shared_weights
from genseg_fed.mlo.trainer import build_networks


def test_train_replies_carry_the_same_metric_keys_in_every_round(tiny_experiment, tmp_path: Path) -> None:
    """Round 1 pre-trains the generator and runs level III; round 2 runs neither; a site that lost its
    state pre-trains again in round 2. Flower refuses replies whose metric keys differ, so they must not."""
    path = tiny_experiment(
        sites=1,
        heldout=0,
        overrides={"mlo.mode": "genseg", "mlo.hyper_every": 5, "mlo.gen_every": 5},
    )
    cfg = load_config(path)
    torch.manual_seed(0)
    nets = build_networks(cfg.model, channels=1, image_size=cfg.data.image_size, mode="genseg")
    weights = shared_weights(nets.parts(), cfg.federation.share)
    site = cfg.data.sites[0]
    _, first = SiteSession(cfg, site, "train", tmp_path / "a", run_key="r").train_round(
        weights, server_round=1, iterations=1
    )
    _, second = SiteSession(cfg, site, "train", tmp_path / "a", run_key="r").train_round(
        weights, server_round=2, iterations=1
    )
    _, fresh = SiteSession(cfg, site, "train", tmp_path / "b", run_key="r").train_round(
        weights, server_round=2, iterations=1
    )
    assert set(first) == set(second) == set(fresh)
    assert "loss_seg" in first and not any(k.startswith("gen_check") or "level3" in k for k in first)
