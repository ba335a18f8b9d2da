"""Flower ServerApp: the coordinator. Reads the run config and hands over to the federation loop."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from genseg_fed.fed.packing import PackingGrid, packing_enabled
from genseg_fed.fed.runconfig import experiment_config

from .federation import run_federation

logger = logging.getLogger(__name__)

app = ServerApp()


def _log_to_stderr(*names: str) -> None:
    """Show our INFO logs in the run's log stream without turning on every library's INFO logs."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in names:
        lg = logging.getLogger(name)
        if not lg.handlers:
            lg.addHandler(handler)
            lg.setLevel(logging.INFO)
            lg.propagate = False


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or, with ``resume=true``, continue) the experiment named in the run config."""
    _log_to_stderr("server", "genseg_fed")
    cfg = experiment_config(context.run_config)
    out = str(context.run_config.get("out-dir", "")) or f"runs/{cfg.name}-{context.run_id}"
    out_dir = Path(out).expanduser().resolve()
    state = str(context.run_config.get("state-dir", ""))
    logger.info("run %s: writing the run folder to %s", cfg.name, out_dir)
    report = run_federation(
        PackingGrid(grid) if packing_enabled() else grid,  # one object per weight record (fed/packing.py)
        cfg,
        out_dir,
        resume=bool(context.run_config.get("resume", False)),
        site_state_dir=Path(state).expanduser() if state else None,
    )
    logger.info("report: %s", report)
