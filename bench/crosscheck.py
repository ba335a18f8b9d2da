"""Check that the in-process transport of the benchmarks gives what ``genseg-fed simulate`` gives.

    python bench/crosscheck.py                      # skin (DermIS held out), genseg, 32 px, 2 x 3 iterations
    python bench/crosscheck.py --mode seg-only --set federation.rounds=3

Runs one small federation twice: through ``genseg-fed simulate`` (a real Flower SuperLink in simulation mode,
virtual SuperNodes on Ray, one CPU per ClientApp) and through :class:`server.inprocess.InProcessGrid` in this
process (one torch thread). Then compares the final global weights array by array, the test Dice of every
round and the cross-site matrix. Writes ``<out>/crosscheck/crosscheck.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, command_line, machine_info, run_federated, setup_runtime, write_json

CONFIG = REPO / "configs/skin3-loso-dermis.yaml"
SMALL = [
    "data.image_size=32",
    "federation.rounds=2",
    "federation.local_iterations=3",
    "seed=0",
    "device=cpu",
]


def compare(a: Path, b: Path) -> dict[str, Any]:
    """Array-by-array comparison of two runs' final global weights and their recorded Dice."""
    from genseg_fed.checkpoint import load_checkpoint

    wa, wb = load_checkpoint(a / "checkpoint.pt")["weights"], load_checkpoint(b / "checkpoint.pt")["weights"]
    keys = sorted(set(wa) | set(wb))
    diffs = {k: float(np.max(np.abs(wa[k] - wb[k]))) if k in wa and k in wb else None for k in keys}
    ha, hb = (json.loads((p / "metrics.json").read_text()) for p in (a, b))
    dice_a = [{s: m["global"]["dice"] for s, m in r["evaluate"].items()} for r in ha["rounds"]]
    dice_b = [{s: m["global"]["dice"] for s, m in r["evaluate"].items()} for r in hb["rounds"]]
    cross_a, cross_b = ha["crosssite"], hb["crosssite"]
    return {
        "arrays": len(keys),
        "missing": [k for k, v in diffs.items() if v is None],
        "identical_arrays": sum(v == 0.0 for v in diffs.values()),
        "max_abs_difference": max((v for v in diffs.values() if v is not None), default=None),
        "dice_per_round": {"simulate": dice_a, "inprocess": dice_b},
        "dice_identical": dice_a == dice_b,
        "crosssite_identical": cross_a["dice"] == cross_b["dice"] if cross_a and cross_b else None,
        "crosssite_models": cross_a["models"] if cross_a else None,
    }


def _relative(arg: str) -> str:
    path = Path(arg)
    return str(path.relative_to(REPO)) if path.is_absolute() and path.is_relative_to(REPO) else arg


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["seg-only", "aug", "genseg"], default="genseg")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, default=Path("bench/results/quick"))
    args = ap.parse_args(argv)

    setup_runtime(1)
    out = args.out / "crosscheck"
    overrides = [*SMALL, f"mlo.mode={args.mode}", *args.extra]
    sim, inproc = out / "simulate", out / "inprocess"
    for folder in (sim, inproc):
        shutil.rmtree(folder, ignore_errors=True)

    t0 = time.perf_counter()
    cmd = [
        str(Path(sys.executable).with_name("genseg-fed")),
        "simulate",
        "--config",
        str(CONFIG),
        "--out",
        str(sim),
    ]
    cmd += ["--cpus-per-client", "1", "--no-progress"]
    for item in overrides:
        cmd += ["--set", item]
    subprocess.run(cmd, check=True, cwd=REPO)
    simulate_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    run_federated(CONFIG, overrides, inproc, progress=False)
    inprocess_seconds = time.perf_counter() - t0

    result = compare(sim, inproc)
    result |= {
        "overrides": overrides,
        "simulate_seconds": simulate_seconds,
        "inprocess_seconds": inprocess_seconds,
        # as a user types it from the repository root (no machine-specific paths)
        "simulate_command": " ".join(["genseg-fed", *(_relative(c) for c in cmd[1:])]),
        "command": command_line(),
        "machine": machine_info(1),
    }
    write_json(result, out / "crosscheck.json")
    same = result["identical_arrays"] == result["arrays"] and not result["missing"]
    print(
        f"{result['identical_arrays']} of {result['arrays']} global weight arrays bit-identical "
        f"(max |difference| {result['max_abs_difference']:.3g}); Dice per round identical: {result['dice_identical']}; "
        f"cross-site matrix identical: {result['crosssite_identical']}; simulate {simulate_seconds:.0f} s, "
        f"in-process {inprocess_seconds:.0f} s"
    )
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
