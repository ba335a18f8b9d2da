"""Cost per training iteration of each method on the same data, in process CPU time and wall time, in one run.

    python bench/step_cost.py                                   # default site (MNI152 hospital-a, 64 px)
    python bench/step_cost.py --config configs/skin3-loso-dermis.yaml --threads 1
    python bench/step_cost.py --set data.image_size=128 --iterations 200
    python bench/step_cost.py --variant "seg-only=mlo.mode=seg-only" --variant "exact=mlo.hyper_estimator=exact;mlo.hyper_every=5"

Variants (default: seg-only, seg-only with classic augmentation, aug and genseg with the config's settings)
are stepped in turn, in ``--blocks`` interleaved blocks, so that a change in machine load hits them alike.
Each iteration is timed with ``time.process_time()`` (this process's CPU time, which a loaded machine
disturbs far less than wall time) and ``time.perf_counter()``. Costs are means over the timed iterations,
so a pool refresh every ``mlo.pool_refresh`` iterations is included at its amortised share (time at least
that many iterations). Generator pre-training steps are timed separately the same way.

Prints, per variant: CPU and wall seconds per iteration and their ratio to seg-only, the wall-time split over
the levels (I = pix2pix, synthetic = pool / rendering, III = hypergradient, II = segmenter), the
pre-training step cost, and the cost of a whole run of ``mlo.iterations`` iterations *including* generator
pre-training relative to a seg-only run of the same iteration count.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from genseg_fed.config import Config, SiteSpec, load_config
from genseg_fed.data import Augmenter
from genseg_fed.local import load_split
from genseg_fed.mlo.trainer import GenSegTrainer, build_networks
from genseg_fed.models import count_parameters
from genseg_fed.runtime import resolve_device

LEVELS = ("time_level1", "time_synthetic", "time_level3", "time_level2")
DEFAULT_VARIANTS = {
    "seg-only": ("mlo.mode=seg-only",),
    "classic": ("mlo.mode=seg-only", "augment.classic=true"),
    "aug": ("mlo.mode=aug",),
    "genseg": ("mlo.mode=genseg",),
}
TARGET_STEP, TARGET_RUN = 3.0, 4.0  # issue "GenSeg that earns its cost": genseg vs seg-only, CPU time


@dataclass
class Timings:
    """Per-step CPU and wall seconds of one trainer, and its mean wall seconds per level."""

    cpu: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    levels: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in LEVELS})

    def mean_levels(self) -> dict[str, float]:
        return {k: statistics.mean(v) if v else 0.0 for k, v in self.levels.items()}


def time_interleaved(trainers: Mapping[str, Any], iterations: int, blocks: int) -> dict[str, Timings]:
    """Step the trainers in turn, ``blocks`` times ``iterations // blocks`` steps each.

    Interleaving spreads a shared machine's load changes over all trainers alike.
    """
    out = {name: Timings() for name in trainers}
    per_block = max(1, iterations // blocks)
    for _ in range(blocks):
        for name, trainer in trainers.items():
            t = out[name]
            for _ in range(per_block):
                c0, w0 = time.process_time(), time.perf_counter()
                stats = trainer.step()
                t.cpu.append(time.process_time() - c0)
                t.wall.append(time.perf_counter() - w0)
                for k in LEVELS:
                    t.levels[k].append(stats.get(k, 0.0))
    return out


def build_trainers(
    config: Path | None, site: str | None, variants: Mapping[str, tuple[str, ...]], base: list[str]
) -> dict[str, GenSegTrainer]:
    """One trainer per variant (``base`` overrides, then the variant's), on the same site split."""
    trainers = {}
    for label, overrides in variants.items():
        cfg = load_config(config, [*base, *overrides])
        split = load_split(cfg, pick_site(cfg, site))
        torch.manual_seed(cfg.seed)
        nets = build_networks(
            cfg.model, channels=cfg.data.channels, image_size=cfg.data.image_size, mode=cfg.mlo.mode
        )
        trainers[label] = GenSegTrainer(
            cfg.mlo,
            nets,
            split.train,
            split.val,
            Augmenter(cfg.augment, seed=cfg.seed),
            device=resolve_device(cfg.device),
        )
    return trainers


def pick_site(cfg: Config, name: str | None) -> SiteSpec:
    """The training site called ``name`` (default: the first)."""
    return next((s for s in cfg.data.sites if s.name == name), cfg.data.sites[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--site", default=None, help="site name from the config (default: the first site)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=KEY=VALUE;KEY=VALUE",
        help="a variant to time (repeatable); the first is the reference. Default: seg-only, classic, aug, genseg",
    )
    ap.add_argument("--iterations", type=int, default=100, help="timed main iterations per variant")
    ap.add_argument(
        "--pretrain-iterations", type=int, default=20, help="timed pre-training steps per variant"
    )
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=4, help="interleaved blocks over the variants")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    variants = DEFAULT_VARIANTS
    if args.variant:
        variants = {}
        for item in args.variant:
            label, _, rest = item.partition("=")
            variants[label] = tuple(o for o in rest.split(";") if o)
    trainers = build_trainers(args.config, args.site, variants, args.overrides)
    reference = next(iter(trainers))

    # Pre-training steps first (they are the trainers' first steps), then skip to the main iterations.
    pretraining = {k: t for k, t in trainers.items() if t.pretrain_steps}
    pre = time_interleaved(pretraining, args.pretrain_iterations, args.blocks) if pretraining else {}
    for t in trainers.values():
        t.iteration = t.pretrain_steps
        for _ in range(args.warmup):
            t.step()
    main_t = time_interleaved(trainers, args.iterations, args.blocks)

    base_cpu = statistics.mean(main_t[reference].cpu)
    base_wall = statistics.mean(main_t[reference].wall)
    run_iterations = cfg.mlo.iterations
    site = pick_site(cfg, args.site)
    print(
        f"{site.name}, {cfg.data.image_size}px, batch {cfg.mlo.batch_size}, {args.threads} thread(s), "
        f"{resolve_device(cfg.device)}; CPU = process time, means over {args.iterations} iterations"
    )
    print(
        f"{'variant':14} {'CPU s/it':>9} {'x ref':>6} {'wall s/it':>9} {'x ref':>6} | {'I':>6} {'syn':>6} "
        f"{'III':>6} {'II':>6} | {'pre s/step':>10} {'run x ref':>9}"
    )
    rows = []
    for label, t in main_t.items():
        trainer = trainers[label]
        cpu, wall = statistics.mean(t.cpu), statistics.mean(t.wall)
        pre_cpu = statistics.mean(pre[label].cpu) if label in pre else 0.0
        run_ratio = (trainer.pretrain_steps * pre_cpu + run_iterations * cpu) / (run_iterations * base_cpu)
        lv = t.mean_levels()
        rows.append(
            {
                "variant": label,
                "overrides": list(variants[label]),
                "cpu_seconds_per_iteration": cpu,
                "wall_seconds_per_iteration": wall,
                "cpu_ratio": cpu / base_cpu,
                "wall_ratio": wall / base_wall,
                "pretrain_steps": trainer.pretrain_steps,
                "pretrain_cpu_seconds_per_step": pre_cpu,
                "run_iterations": run_iterations,
                "run_cpu_ratio": run_ratio,
                "parameters": {k: count_parameters(m) for k, m in trainer.nets.parts().items()},
                **lv,
            }
        )
        print(
            f"{label:14} {cpu:9.4f} {cpu / base_cpu:6.2f} {wall:9.4f} {wall / base_wall:6.2f} | "
            + " ".join(f"{lv[k]:6.3f}" for k in LEVELS)
            + f" | {pre_cpu:10.4f} {run_ratio:9.2f}"
        )
    for row in rows:
        if row["variant"] == "genseg":
            ok_step = row["cpu_ratio"] <= TARGET_STEP
            ok_run = row["run_cpu_ratio"] <= TARGET_RUN
            print(
                f"genseg: {row['cpu_ratio']:.2f}x {reference} per iteration in CPU time (target <= {TARGET_STEP}x: "
                f"{'met' if ok_step else 'NOT met'}); a {run_iterations}-iteration run with its "
                f"{row['pretrain_steps']} pre-training steps: {row['run_cpu_ratio']:.2f}x (target <= {TARGET_RUN}x: "
                f"{'met' if ok_run else 'NOT met'})"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "site": site.name,
            "config": str(args.config) if args.config else None,
            "overrides": args.overrides,
            "image_size": cfg.data.image_size,
            "batch_size": cfg.mlo.batch_size,
            "iterations": args.iterations,
            "threads": args.threads,
            "device": str(resolve_device(cfg.device)),
            "machine": platform.platform(),
            "torch": torch.__version__,
        }
        args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
