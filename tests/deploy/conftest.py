"""Deployment tests reuse the tiny experiment and in-process federation of tests/fed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "_deploy_fed_conftest", Path(__file__).parents[1] / "fed" / "conftest.py"
)
_fed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fed)

tiny_federation = _fed.tiny_federation
write_tiny_experiment = _fed.write_tiny_experiment


@pytest.fixture(scope="session")
def experiment_writer():
    """``write_tiny_experiment`` of tests/fed (tiny PNG sites + an experiment YAML) for any scope."""
    return write_tiny_experiment
