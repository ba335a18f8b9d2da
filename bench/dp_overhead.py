"""Seconds per local iteration with and without sample-level DP, measured in one run.

    python bench/dp_overhead.py                         # default site (MNI152 hospital-a, 64 px), genseg
    python bench/dp_overhead.py --modes seg-only aug genseg --iterations 30
    python bench/dp_overhead.py --json bench/results/dp_overhead.json

For each mode, a plain :class:`GenSegTrainer` and a :class:`PrivateGenSegTrainer` (noise calibrated
to ``--epsilon`` over ``--planned`` iterations) start from the same weights and are stepped in
interleaved blocks, so a change in machine load hits both alike. Prints the mean process CPU seconds per
iteration, the DP / plain ratio and where the time goes (levels I, II, III).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from bench.step_cost import LEVELS, time_interleaved
from genseg_fed.config import load_config
from genseg_fed.data import Augmenter
from genseg_fed.local import load_split
from genseg_fed.mlo.trainer import GenSegTrainer, build_networks
from genseg_fed.privacy import PrivateGenSegTrainer
from genseg_fed.runtime import resolve_device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--site", default=None, help="site name from the config (default: the first site)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--modes", nargs="+", default=["genseg"], choices=["seg-only", "aug", "genseg"])
    ap.add_argument("--iterations", type=int, default=20, help="timed iterations per trainer")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=4, help="interleaved blocks (plain, DP, plain, DP ...)")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--planned", type=int, default=150, help="iterations the budget covers (5 x 30)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    site = next((s for s in cfg.data.sites if s.name == args.site), cfg.data.sites[0])
    split = load_split(cfg, site)
    device = resolve_device(cfg.device)
    privacy = replace(cfg.privacy, enabled=True)
    delta = privacy.delta

    rows = []
    print(
        f"{site.name}, {cfg.data.image_size}px, batch {cfg.mlo.batch_size}, {args.threads} threads, {device}"
    )
    print(
        f"{'mode':9} {'plain CPU s/it':>14} {'DP CPU s/it':>11} {'ratio':>6}   DP wall: level I / syn / III / II (s)"
    )
    for mode in args.modes:
        mlo = replace(cfg.mlo, mode=mode)
        trainers = {}
        for kind in ("plain", "dp"):
            torch.manual_seed(cfg.seed)
            nets = build_networks(
                cfg.model, channels=cfg.data.channels, image_size=cfg.data.image_size, mode=mode
            )
            common = (mlo, nets, split.train, split.val, Augmenter(cfg.augment, seed=cfg.seed))
            if kind == "plain":
                trainers[kind] = GenSegTrainer(*common, device=device)
            else:
                trainers[kind] = PrivateGenSegTrainer(
                    *common,
                    device=device,
                    privacy=privacy,
                    epsilon=args.epsilon,
                    delta=delta,
                    planned_iterations=args.planned,
                )
            for _ in range(args.warmup):
                trainers[kind].step()
        timings = time_interleaved(trainers, args.iterations, args.blocks)
        lv = {kind: t.mean_levels() for kind, t in timings.items()}
        plain, dp = statistics.mean(timings["plain"].cpu), statistics.mean(timings["dp"].cpu)
        mech = trainers["dp"].mechanisms
        rows.append(
            {
                "mode": mode,
                "plain_cpu_seconds_per_iteration": plain,
                "dp_cpu_seconds_per_iteration": dp,
                "ratio": dp / plain,
                "levels_plain": lv["plain"],
                "levels_dp": lv["dp"],
                "noise_multipliers": {n: m.noise_multiplier for n, m in mech.items()},
            }
        )
        print(
            f"{mode:9} {plain:14.3f} {dp:11.3f} {dp / plain:6.2f}   "
            + " / ".join(f"{lv['dp'][k]:.3f}" for k in LEVELS)
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "site": site.name,
            "image_size": cfg.data.image_size,
            "batch_size": cfg.mlo.batch_size,
            "synthetic_per_real": cfg.mlo.synthetic_per_real,
            "iterations": args.iterations,
            "epsilon": args.epsilon,
            "planned": args.planned,
            "threads": args.threads,
            "device": str(device),
            "machine": platform.platform(),
            "torch": torch.__version__,
        }
        args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
