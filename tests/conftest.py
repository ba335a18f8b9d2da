"""Test-wide settings: offline Flower, two torch threads, deterministic seeds, shared-data location."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Flower must never try the network here; keep its state out of the user's home.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_HOME", str(REPO / ".flwr"))
# Real data for tests that need it: ../shared/data next to the checkout unless told otherwise.
os.environ.setdefault("GENSEG_SHARED_DATA", str(REPO.parent / "shared" / "data"))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def shared_file() -> Callable[[str], Path]:
    """``shared_file("ph2_skin_128.npz")``: path to a shared real-data file, or skip the test when absent."""

    def find(name: str) -> Path:
        root = Path(os.environ["GENSEG_SHARED_DATA"])
        path = root / name
        if not path.is_file():
            pytest.skip(f"{name} not found in {root} (set GENSEG_SHARED_DATA to the shared data folder)")
        return path

    return find
