"""Privacy-utility of GenSeg-Fed: test Dice of the global model at per-site epsilon in {1, 3, 8, inf}.

    python bench/privacy_utility.py --quick      # 3 rounds x 8 local iterations (< 15 min on 2 cores)
    python bench/privacy_utility.py              # the config's own rounds x local iterations
    python bench/privacy_utility.py --epsilons 3 inf --set mlo.mode=seg-only --out runs/pu-seg

Every run is the same federated experiment (default: the embedded MNI152 sites, genseg mode, the
same seed); only the per-site budget changes. ``inf`` is GenSeg-Fed without DP. Sites run the real
ClientApp in this process (``server.inprocess.InProcessGrid``: no SuperLink, same messages).
Writes ``<out>/privacy_utility.json`` and prints a markdown table: mean test Dice over the training
sites' test images and on the held-out site, epsilon spent per site and the calibrated noise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.client_app import app as client_app
from genseg_fed.fed.runconfig import experiment_config
from server.federation import run_federation
from server.inprocess import InProcessGrid

QUICK = ["federation.rounds=3", "federation.local_iterations=8"]


def run_one(
    epsilon: float, *, config: Path | None, overrides: list[str], out: Path, clip_only: bool = False
) -> dict[str, Any]:
    """One federated run at per-site ``epsilon`` (inf: no DP); returns its summary row.

    ``clip_only``: the private trainer (per-record clipping, Poisson sampling, independent samples
    per mechanism) without noise, epsilon infinite: separates the cost of clipping from that of noise.
    """
    private = math.isfinite(epsilon)
    extra = [f"privacy.enabled={str(private or clip_only).lower()}", "federation.baselines=false"]
    if private:
        extra.append(f"privacy.epsilon={epsilon}")
    if clip_only:
        extra.append("privacy.epsilon=.inf")
    run_config = {
        "config": str(config.resolve()) if config else "configs/default.yaml",
        "overrides": ";".join([*overrides, *extra]),
        "state-dir": str(out / "sites"),
        "out-dir": str(out),
    }
    cfg = experiment_config(run_config)
    n_nodes = len(cfg.data.sites) + len(cfg.data.heldout)
    grid = InProcessGrid.for_partitions(
        client_app, n_nodes=n_nodes, run_config=run_config, keep_replies=False
    )
    started = time.perf_counter()
    run_federation(grid, cfg, out, site_state_dir=out / "sites")
    seconds = time.perf_counter() - started
    history = json.loads((out / "metrics.json").read_text())
    last = history["rounds"][-1]["evaluate"]
    train_sites = [s.name for s in cfg.data.sites]
    held = [s.name for s in cfg.data.heldout]

    def dice(site: str) -> float:
        return float(last.get(site, {}).get("global", {}).get("dice", float("nan")))

    privacy_sites = history.get("privacy", {}).get("sites", {})
    # an infinite epsilon (no noise) is not sent: Flower metric records hold finite numbers
    spent = {n: s["rounds"][-1].get("epsilon", math.inf) for n, s in privacy_sites.items() if s["rounds"]}
    noise = {
        n: {k[len("noise-") :]: v for k, v in s["rounds"][-1].items() if k.startswith("noise-")}
        for n, s in privacy_sites.items()
        if s["rounds"]
    }
    return {
        "epsilon_target": epsilon if private else ("inf, DP trainer without noise" if clip_only else "inf"),
        "dice": {s: dice(s) for s in [*train_sites, *held]},
        "dice_train_sites": float(np.nanmean([dice(s) for s in train_sites])),
        "dice_heldout": float(np.nanmean([dice(s) for s in held])) if held else None,
        "epsilon_spent": spent,
        "noise_multipliers": noise,
        "declined": sum(len(r.get("declined", {})) for r in history["rounds"]),
        "rounds": len(history["rounds"]),
        "local_iterations": cfg.federation.local_iterations,
        "seconds": seconds,
    }


def _fmt(x: Any) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--config", type=Path, default=None, help="experiment YAML (default: configs/default.yaml)"
    )
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--epsilons", nargs="*", type=float, default=[1.0, 3.0, 8.0, math.inf])
    ap.add_argument("--quick", action="store_true", help=f"shorter runs: {' '.join(QUICK)}")
    ap.add_argument(
        "--no-clip-only", dest="clip_only", action="store_false", help="skip the DP-trainer-without-noise run"
    )
    ap.add_argument("--out", type=Path, default=Path("runs/privacy_utility"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    overrides = [*(QUICK if args.quick else []), *args.overrides]
    runs = [(eps, False) for eps in args.epsilons] + ([(math.inf, True)] if args.clip_only else [])
    rows = []
    for eps, clip_only in runs:
        tag = ("inf" if math.isinf(eps) else f"{eps:g}") + ("-clip-only" if clip_only else "")
        out = args.out / f"eps-{tag}"
        row = run_one(eps, config=args.config, overrides=overrides, out=out, clip_only=clip_only)
        rows.append(row)
        print(
            f"epsilon {tag}: Dice {row['dice_train_sites']:.3f} (train sites), {row['seconds']:.0f} s",
            flush=True,
        )

    print()
    print(
        "| per-site epsilon | test Dice (training sites) | test Dice (held-out) | epsilon spent | sigma (levels I/II, III) |"
    )
    print("|---|---|---|---|---|")
    for row in rows:
        target = row["epsilon_target"]
        target = "inf (no DP)" if target == "inf" else target if isinstance(target, str) else f"{target:g}"
        spent = ", ".join(f"{v:.2f}" for v in row["epsilon_spent"].values()) or "–"
        noise = next(iter(row["noise_multipliers"].values()), {})
        sigma = (
            f"{noise.get('seg', float('nan')):.2f}, {noise.get('hyper', float('nan')):.2f}" if noise else "–"
        )
        print(
            f"| {target} | {_fmt(row['dice_train_sites'])} | {_fmt(row['dice_heldout'])} | {spent} | {sigma} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python bench/privacy_utility.py " + " ".join(sys.argv[1:]),
        "overrides": overrides,
        "threads": args.threads,
        "machine": platform.platform(),
        "torch": torch.__version__,
    }
    (args.out / "privacy_utility.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
