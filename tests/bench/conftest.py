"""Benchmark-harness tests reuse the tiny experiment of tests/fed (tiny PNG sites + an experiment YAML)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "_bench_fed_conftest", Path(__file__).parents[1] / "fed" / "conftest.py"
)
_fed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fed)

write_tiny_experiment = _fed.write_tiny_experiment
