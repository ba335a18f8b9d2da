"""Seconds per federated round in a real deployment beyond local compute, before and after tuning.

    python bench/round_overhead.py                          # flower vs tuned, 2 sites, 3 rounds
    python bench/round_overhead.py --variants flower,warm,tuned,packed,packed-memdb --rounds 4 --json bench/results/round_overhead.json

Each variant starts a whole TLS federation with SuperNode authentication on loopback (one SuperLink,
one SuperNode per site, the real ServerApp and ClientApp; genseg_fed.deploy.local), runs the same tiny
experiment (32 px, 1 local iteration per round, no baselines) and reads the coordinator's metrics:

* round  = wall-clock seconds of the round at the coordinator (train + aggregate + evaluate);
* compute = the slowest site's own training seconds in that round (its ``seconds`` metric);
* overhead = round - compute: message transfer, process start, imports, polling, evaluation
  (evaluation of the 32 px model is about 0.1 s, so nearly all of this is overhead).

Variants:

* ``flower``: Flower 1.42 as shipped, and the app as it was: ``flower-supernode`` starts a new
  ``flwr-clientapp`` interpreter per message (imports torch, MONAI, ...), SuperNodes poll every 3 s
  when idle, SuperExec polls every 1 s, message objects (one per weight tensor) move 2 at a time.
* ``warm``: only the warm ClientApp runner (heavy modules imported once; one fork per message).
* ``tuned``: what ``genseg-fed supernode`` / ``superlink`` change: the warm runner, a 0.5 s idle
  poll, SuperExec polling every 0.2 s and 8 concurrent object transfers.
* ``packed``: ``tuned`` plus one object per weight record instead of one per tensor
  (``genseg_fed/fed/packing.py``): everything genseg-fed does by default.
* ``packed-memdb``: ``packed`` with the SuperLink's state in memory instead of its SQLite file.

Round 1 includes one-off costs (unpacking the app, loading data, first torch calls); the summary
uses the later rounds. The machine's load average is recorded: on a shared machine it matters.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from genseg_fed.deploy.demo import write_demo_sites
from genseg_fed.deploy.local import LocalFederation, read_metrics

FLOWER_DEFAULTS = {  # Flower 1.42's own values of what `tuned` changes, and no packing
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0",
    "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS": "2",
    "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES": "2",
    "GENSEG_PACK_WEIGHTS": "0",
}
UNPACKED = {"GENSEG_PACK_WEIGHTS": "0"}
VARIANTS: dict[str, dict[str, Any]] = {
    "flower": {"warm": False, "poll": 3.0, "env": FLOWER_DEFAULTS},
    "warm": {"warm": True, "poll": 3.0, "env": FLOWER_DEFAULTS},
    "tuned": {"warm": True, "poll": 0.5, "env": UNPACKED},
    "packed": {"warm": True, "poll": 0.5, "env": {}},
    "packed-memdb": {"warm": True, "poll": 0.5, "env": {}, "database": False},
}

EXPERIMENT = """\
name: round-overhead
seed: 0
data: {{image_size: 32, channels: 1, n_train: 6, n_val: 2, test_fraction: 0.3, heldout: [],
       sites: [{sites}]}}
model: {{seg_features: [8, 16, 32], gen_features: 8, gen_depth: 2, disc_features: 8, disc_layers: 2}}
mlo: {{batch_size: 2}}
federation: {{rounds: {rounds}, local_iterations: {iterations}, baselines: false, wait_timeout: 600,
             round_timeout: 900}}
"""


def run_variant(name: str, root: Path, *, sites: list[str], rounds: int, iterations: int) -> dict[str, Any]:
    spec = VARIANTS[name]
    data = write_demo_sites(root / "data", sites, n=12, size=32)
    experiment = root / "experiment.yaml"
    experiment.write_text(
        EXPERIMENT.format(
            sites=", ".join(f"{{name: {s}, source: folder}}" for s in sites),
            rounds=rounds,
            iterations=iterations,
        )
    )
    load_before = os.getloadavg()
    started = time.perf_counter()
    with LocalFederation(
        root / name,
        warm=spec["warm"],
        poll_interval=spec["poll"],
        env=spec["env"],
        database=spec.get("database", True),
    ) as fed:
        fed.make_certs(sites)
        fed.start_superlink()
        for site in sites:
            fed.register(site)
        for site in sites:
            fed.start_supernode(site, data[site])
        fed.wait_online(len(sites))
        ready = time.perf_counter() - started
        out = root / name / "out"
        t0 = time.perf_counter()
        run_id = fed.submit({"config": str(experiment), "out-dir": str(out)})
        info = fed.wait(run_id, timeout=3600)
        run_seconds = time.perf_counter() - t0
    if info.get("status") != "finished:completed":
        raise SystemExit(f"{name}: run {run_id} ended {info.get('status')}: {info.get('status-details')}")
    per_round = []
    for rec in read_metrics(out)["rounds"]:
        compute = max(float(m.get("seconds", 0.0)) for m in rec["train"].values())
        per_round.append(
            {
                "round": rec["round"],
                "round_s": round(rec["seconds"], 2),
                "compute_s": round(compute, 2),
                "overhead_s": round(rec["seconds"] - compute, 2),
            }
        )
    later = per_round[1:] or per_round
    return {
        "variant": name,
        "setup_s": round(ready, 1),
        "run_s": round(run_seconds, 1),
        "rounds": per_round,
        "median_round_s": round(statistics.median(r["round_s"] for r in later), 2),
        "median_compute_s": round(statistics.median(r["compute_s"] for r in later), 2),
        "median_overhead_s": round(statistics.median(r["overhead_s"] for r in later), 2),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="flower,packed", help=f"comma-separated, of {sorted(VARIANTS)}")
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=1, help="local GenSeg iterations per round")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (logs) instead of a temp one")
    args = ap.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    sites = [f"hospital-{chr(ord('a') + i)}" for i in range(args.sites)]
    results = []
    with tempfile.TemporaryDirectory(prefix="round-overhead-") as tmp:
        root = args.keep or Path(tmp)
        for name in names:
            result = run_variant(name, root, sites=sites, rounds=args.rounds, iterations=args.iterations)
            results.append(result)
            print(json.dumps(result), file=sys.stderr, flush=True)
    print(
        f"\n{args.sites} sites, {args.rounds} rounds, {args.iterations} local iteration(s), 32 px, TLS + auth"
    )
    print(f"{'variant':<8} {'round s':>8} {'compute s':>10} {'overhead s':>11}   (median of rounds 2..)")
    for r in results:
        print(
            f"{r['variant']:<8} {r['median_round_s']:>8.1f} {r['median_compute_s']:>10.1f} {r['median_overhead_s']:>11.1f}"
        )
    base = next((r for r in results if r["variant"] == "flower"), None)
    for r in results:
        if base is not None and r is not base and r["median_overhead_s"] > 0:
            print(
                f"overhead {base['variant']} / {r['variant']}: {base['median_overhead_s'] / r['median_overhead_s']:.1f}x"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "machine": {
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
            },
            "settings": {"sites": args.sites, "rounds": args.rounds, "iterations": args.iterations},
            "results": results,
        }
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
