"""A tiny federation for fast tests: real ClientApp and Coordinator, messages delivered in-process.

``InProcessGrid`` (:mod:`server.inprocess`) stands in for the SuperLink's transport only: every message is
handled by the real ``client.client_app.app`` with a real Flower ``Context``; replies are kept in ``sent``
so tests can inspect exactly what each site sent. The real Flower runtimes (simulation and deployment) are
exercised by the slow end-to-end tests.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from flwr.app import Message

from client.client_app import app as client_app
from genseg_fed.data import SiteData, write_site_folder
from server.inprocess import SERVER_NODE, InProcessGrid

__all__ = ["SERVER_NODE", "InProcessGrid", "tiny_experiment", "tiny_federation", "write_tiny_experiment"]

SIZE = 32
TINY_CONFIG = {
    "name": "tiny",
    "seed": 0,
    "data": {"image_size": SIZE, "channels": 1, "n_train": 4, "n_val": 2, "test_fraction": 0.3},
    "model": {
        "seg_features": [8, 16, 32],
        "gen_features": 8,
        "gen_depth": 2,
        "disc_features": 8,
        "disc_layers": 2,
    },
    # Tiny generator pre-training and pool so that every phase of GenSeg runs in a few steps.
    "mlo": {"batch_size": 2, "pretrain_iterations": 2, "pool_size": 2, "pool_refresh": 3},
    "federation": {"rounds": 2, "local_iterations": 2, "wait_timeout": 60.0, "round_timeout": 120.0},
}


def _write_site(root: Path, name: str, seed: int, shift: float) -> Path:
    if (root / name).is_dir():
        return root / name
    rng = np.random.default_rng(seed)
    n = 10
    masks = np.zeros((n, 1, SIZE, SIZE), np.float32)
    for i in range(n):
        r, c = rng.integers(4, 16, size=2)
        masks[i, 0, r : r + 10, c : c + 9] = 1
    images = np.clip(masks * 1.1 - 0.6 + shift + 0.1 * rng.standard_normal(masks.shape), -1, 1).astype(
        np.float32
    )
    ids = tuple(f"{name}{i:02d}" for i in range(n))
    write_site_folder(SiteData(name, images, masks, ids, ids), root / name)
    return root / name


def write_tiny_experiment(
    root: Path, *, sites: int = 2, heldout: int = 1, overrides: dict | None = None
) -> Path:
    """Tiny folder sites under ``root/data`` and an experiment YAML using them; returns the YAML path."""
    cfg = yaml.safe_load(yaml.safe_dump(TINY_CONFIG))
    specs = []
    for i in range(sites + heldout):
        name = f"site-{chr(ord('a') + i)}"
        path = _write_site(root / "data", name, seed=i, shift=0.15 * i)
        specs.append({"name": name, "source": "folder", "path": str(path)})
    cfg["data"]["sites"] = specs[:sites]
    cfg["data"]["heldout"] = specs[sites:]
    for key, value in (overrides or {}).items():
        section, _, leaf = key.partition(".")
        cfg[section][leaf] = value
    path = root / "experiment.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def tiny_federation(tmp_path: Path) -> Callable[..., tuple[dict, InProcessGrid, Path]]:
    """``make(sites=2, heldout=1, **overrides)`` -> (config dict, grid, out dir)."""

    def make(
        sites: int = 2,
        heldout: int = 1,
        overrides: dict | None = None,
        intercept: Callable[[int, Message], Message | None] | None = None,
    ) -> tuple[dict, InProcessGrid, Path]:
        path = write_tiny_experiment(tmp_path, sites=sites, heldout=heldout, overrides=overrides)
        cfg = yaml.safe_load(path.read_text())
        out = tmp_path / "run"
        run_config = {
            "config": str(path),
            "overrides": "",
            "state-dir": str(out / "sites"),
            "out-dir": str(out),
        }
        node_configs = {
            100 + i: {"partition-id": i, "num-partitions": sites + heldout} for i in range(sites + heldout)
        }
        return cfg, InProcessGrid(client_app, node_configs, run_config, intercept=intercept), out

    return make


@pytest.fixture
def tiny_experiment(tmp_path: Path) -> Callable[..., Path]:
    """``make(sites=2, heldout=1, overrides=None)`` -> path of a tiny experiment YAML (real PNG sites)."""

    def make(**kwargs) -> Path:
        return write_tiny_experiment(tmp_path, **kwargs)

    return make
