"""End to end on the real Flower simulation runtime: SuperLink, virtual SuperNodes, our apps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from genseg_fed.checkpoint import load_checkpoint
from genseg_fed.cli import main

pytestmark = pytest.mark.slow


def test_simulate_two_sites_two_rounds_real_flower(tmp_path: Path, tiny_experiment, capsys) -> None:
    config = tiny_experiment(sites=2, heldout=1)
    out = tmp_path / "run"
    rc = main(["simulate", "--config", str(config), "--out", str(out), "--no-progress", "--timeout", "600"])
    assert rc == 0, capsys.readouterr().err
    for name in ("report.md", "metrics.json", "checkpoint.pt", "dice_per_round.png", "crosssite_dice.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    # the global weights moved in both rounds (aggregated update norm > 0)
    assert all(r["aggregated"] and r["update_norm"] > 0 for r in rounds)
    cross = metrics["crosssite"]
    dice = np.array(cross["dice"], dtype=float)
    assert dice.shape == (3, 3) and np.isfinite(dice).all()
    assert cross["heldout"] == ["site-c"]
    initial = load_checkpoint(out / "checkpoint.pt")["initial"]
    final = torch.load(out / "global_segmenter.pt")
    key = next(iter(final))
    assert not np.allclose(initial[f"segmenter/{key}"], final[key].numpy())
    assert "test Dice" in capsys.readouterr().out
