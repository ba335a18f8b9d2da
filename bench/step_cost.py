"""Seconds per training iteration for seg-only, aug and genseg on the same data, measured in one run.

    python bench/step_cost.py                       # default site (MNI152 hospital-a, 64 px)
    python bench/step_cost.py --iterations 40 --set data.image_size=128
    python bench/step_cost.py --json bench/results/step_cost.json

Prints, per mode, the median seconds per iteration, the ratio to seg-only, and where the time goes
(level I = pix2pix step, level II = segmenter step, level III = hypergradient + generator update,
other = batch sampling and mask augmentation). Modes are interleaved in rounds so that a change in
machine load hits them alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from genseg_fed.config import load_config
from genseg_fed.data import MaskAugmenter
from genseg_fed.local import load_split
from genseg_fed.mlo.trainer import GenSegTrainer, build_networks
from genseg_fed.runtime import resolve_device

MODES = ("seg-only", "aug", "genseg")
LEVELS = ("time_level1", "time_level2", "time_level3")


def time_interleaved(
    trainers: Mapping[str, Any], iterations: int, blocks: int
) -> tuple[dict[str, list[float]], dict[str, dict[str, float]]]:
    """Step the trainers in turn, ``blocks`` times ``iterations // blocks`` steps each.

    Interleaving spreads a shared machine's load changes over all trainers alike. Returns the
    seconds of every step per trainer and each trainer's mean seconds per level (``LEVELS``).
    """
    per_iter: dict[str, list[float]] = {name: [] for name in trainers}
    levels: dict[str, dict[str, list[float]]] = {name: {k: [] for k in LEVELS} for name in trainers}
    per_block = max(1, iterations // blocks)
    for _ in range(blocks):
        for name, trainer in trainers.items():
            for _ in range(per_block):
                t0 = time.perf_counter()
                out = trainer.step()
                per_iter[name].append(time.perf_counter() - t0)
                for k in LEVELS:
                    levels[name][k].append(out.get(k, 0.0))
    means = {name: {k: statistics.mean(v) for k, v in lv.items()} for name, lv in levels.items()}
    return per_iter, means


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--site", default=None, help="site name from the config (default: the first site)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--iterations", type=int, default=30, help="timed iterations per mode")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the modes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    site = next((s for s in cfg.data.sites if s.name == args.site), cfg.data.sites[0])
    split = load_split(cfg, site)
    device = resolve_device(cfg.device)

    trainers = {}
    for mode in MODES:
        torch.manual_seed(cfg.seed)
        mlo = type(cfg.mlo)(**{**cfg.mlo.__dict__, "mode": mode})
        nets = build_networks(
            cfg.model, channels=cfg.data.channels, image_size=cfg.data.image_size, mode=mode
        )
        trainers[mode] = GenSegTrainer(
            mlo, nets, split.train, split.val, MaskAugmenter(cfg.augment, seed=cfg.seed), device=device
        )
        for _ in range(args.warmup):
            trainers[mode].step()

    per_iter, levels = time_interleaved(trainers, args.iterations, args.rounds)

    base = statistics.median(per_iter["seg-only"])
    rows = []
    print(
        f"{site.name}, {cfg.data.image_size}px, batch {cfg.mlo.batch_size}, {args.threads} threads, {device}"
    )
    print(
        f"{'mode':9} {'s/iter':>8} {'x seg-only':>10} {'level I':>8} {'level II':>9} {'level III':>10} {'other':>7}"
    )
    for mode in MODES:
        med = statistics.median(per_iter[mode])
        lv = levels[mode]
        other = statistics.mean(per_iter[mode]) - sum(lv.values())
        rows.append(
            {
                "mode": mode,
                "seconds_per_iteration": med,
                "ratio_to_seg_only": med / base,
                **lv,
                "other": other,
            }
        )
        print(
            f"{mode:9} {med:8.4f} {med / base:10.2f} {lv['time_level1']:8.4f} {lv['time_level2']:9.4f} "
            f"{lv['time_level3']:10.4f} {other:7.4f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "site": site.name,
            "image_size": cfg.data.image_size,
            "batch_size": cfg.mlo.batch_size,
            "hyper_every": cfg.mlo.hyper_every,
            "threads": args.threads,
            "device": str(device),
            "machine": platform.platform(),
            "torch": torch.__version__,
        }
        args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
