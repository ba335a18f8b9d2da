"""Does level III earn its cost? An ablation at equal compute on an inner protocol that never sees a test split.

    python bench/level3.py --threads 1                     # 3 skin sites x 3 seeds x every setting
    python bench/level3.py --settings classic aug genseg-fd5 --sites PH2 --seeds 0
    python bench/level3.py --dry-run                       # list the runs (done / to do)

**Inner protocol.** For each real skin site (PH2, DermQuest, DermIS), the site's *test* split (the one every
other study scores on; it depends only on ``data.split_seed`` and ``test_fraction``) is removed first. From the
remaining records, each seed draws N = 12 labelled images (resampled per seed) and ``--eval`` other images that
play the role of the test set here (the *inner evaluation* images; they are never trained on). One site trains
alone (``GenSegTrainer``, as ``genseg-fed train-local`` does); the score is the mean Dice on the inner
evaluation images. Nothing here reads a test split or a held-out site, so the defaults chosen from it leak no
test information.

**Fair data access.** Every setting reads the same 12 labelled images. Settings without level III train on all
12 (``MLOConfig.uses_validation``); ``genseg`` settings train on 9 and drive level III with the other 3.
``aug-9`` trains on the same 9 without using the 3 (it isolates what level III does from what the 3 images do).

**Equal compute.** Every setting runs ``--iterations`` main iterations, except ``aug-eq``, which gets as many
more as make its process CPU time equal to the default ``genseg`` setting's (the ratio is measured in this
run's own interleaved cost probe). Every run records process CPU time and wall time, generator pre-training
included.

Writes ``bench/results/<size>/level3/``: one ``result.json`` per run under ``runs/``, ``summary.json``,
``tables.md``, ``runs.csv`` and ``level3.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    REPO,
    ci,
    command_line,
    machine_info,
    markdown_table,
    paired_difference,
    setup_runtime,
    write_csv,
    write_json,
)

SITES = {  # site -> an experiment YAML that declares it (as a training or held-out site)
    "PH2": "configs/skin3-loso-dermis.yaml",
    "DermQuest": "configs/skin3-loso-dermis.yaml",
    "DermIS": "configs/skin3-loso-ph2.yaml",
}
N_LABELLED, N_VAL = 12, 3
DEFAULT = "genseg-fd5"  # the shipped default (configs/default.yaml); aug-eq matches its CPU time
SETTINGS: dict[str, tuple[str, ...]] = {
    "seg-only": ("mlo.mode=seg-only", "augment.classic=false"),
    "classic": ("mlo.mode=seg-only",),
    "aug": ("mlo.mode=aug",),
    "aug-9": ("mlo.mode=aug",),  # the 9 training images of genseg, the 3 validation images unused
    "aug-eq": ("mlo.mode=aug",),  # more iterations: the CPU time of DEFAULT
    "genseg-fd5": ("mlo.mode=genseg", "mlo.hyper_estimator=fd", "mlo.hyper_every=5"),
    "genseg-fd1": ("mlo.mode=genseg", "mlo.hyper_estimator=fd", "mlo.hyper_every=1"),
    "genseg-exact5": ("mlo.mode=genseg", "mlo.hyper_estimator=exact", "mlo.hyper_every=5"),
    "genseg-decoder": (
        "mlo.mode=genseg",
        "mlo.hyper_params=decoder",
        "mlo.hyper_estimator=fd",
        "mlo.hyper_every=5",
        "mlo.hyper_lr=1e-4",
    ),
    "genseg-pairs": (
        "mlo.mode=genseg",
        "mlo.hyper_params=pairs",
        "mlo.hyper_estimator=fd",
        "mlo.hyper_every=2",
    ),
    # No generator at all: the mean lesion and background colours painted onto the augmented masks, with the
    # same intensity jitter (is the generator worth its images?)
    "paint": ("mlo.mode=aug", "mlo.pretrain_iterations=0", "mlo.gen_every=0"),
}
REFERENCE = "aug"  # paired differences are against this setting


def inner_split(cfg: Any, site: str, seed: int, n_eval: int) -> tuple[Any, Any, Any]:
    """(labelled train, labelled val, inner evaluation) of ``site`` with its test split removed."""
    from genseg_fed.data import load_site, split_site

    spec = next(s for s in (*cfg.data.sites, *cfg.data.heldout) if s.name == site)
    data = load_site(spec, image_size=cfg.data.image_size, channels=cfg.data.channels, empty_masks="error")
    outer = split_site(
        data, n_train=None, n_val=0, test_fraction=cfg.data.test_fraction, seed=cfg.data.split_seed
    )
    pool = outer.train  # every record except the test split
    order = np.random.default_rng([seed, 12345]).permutation(len(pool))
    labelled, inner = order[:N_LABELLED], order[N_LABELLED : N_LABELLED + n_eval]
    val, train = sorted(labelled[:N_VAL]), sorted(labelled[N_VAL:])
    return pool.subset(train), pool.subset(val), pool.subset(sorted(inner))


class Painter:
    """Stands in for the generator: each mask pixel gets the training pairs' mean foreground colour, each
    background pixel their mean background colour (no weights; ``gen_every=0`` so level I never runs)."""

    def __new__(cls, images: np.ndarray, masks: np.ndarray) -> Any:
        import torch

        class _Painter(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                x, m = torch.as_tensor(images), torch.as_tensor(masks)
                self.register_buffer("fg", (x * m).sum(dim=(0, 2, 3)) / m.sum())
                self.register_buffer("bg", (x * (1 - m)).sum(dim=(0, 2, 3)) / (1 - m).sum())
                self.unused = torch.nn.Parameter(torch.zeros(1))  # the trainer's level-I optimiser needs one

            def forward(self, m: torch.Tensor) -> torch.Tensor:
                return m * self.fg[None, :, None, None] + (1 - m) * self.bg[None, :, None, None]

            def arch_parameters(self) -> list[torch.nn.Parameter]:
                return []

        return _Painter()


def run_one(
    site: str, setting: str, seed: int, iterations: int, n_eval: int, extra: Sequence[str]
) -> dict[str, Any]:
    """Train one site alone with one setting; score on the inner evaluation images."""
    import torch

    from genseg_fed.config import load_config
    from genseg_fed.data import Augmenter
    from genseg_fed.evaluation.metrics import evaluate_segmenter
    from genseg_fed.mlo.trainer import GenSegTrainer, build_networks
    from genseg_fed.runtime import resolve_device

    cfg = load_config(REPO / SITES[site], [*SETTINGS[setting], *extra])
    train, val, inner = inner_split(cfg, site, seed, n_eval)
    if not cfg.mlo.uses_validation and setting != "aug-9":
        train = type(train).concat([train, val], train.name)  # fair data access: the 3 images train
    device = resolve_device(cfg.device)
    torch.manual_seed(seed)
    nets = build_networks(
        cfg.model, channels=cfg.data.channels, image_size=cfg.data.image_size, mode=cfg.mlo.mode
    )
    if setting == "paint":
        nets.generator = Painter(train.images, train.masks).to(device)
    trainer = GenSegTrainer(
        cfg.mlo, nets, train, val, Augmenter(cfg.augment, seed=seed), device=device, seed=seed
    )
    curve: dict[int, float] = {}
    c0, w0 = time.process_time(), time.perf_counter()
    done = 0
    for check in sorted({iterations // 2, iterations}):
        stats = trainer.train(check - done)
        done = check
        curve[check] = float(
            evaluate_segmenter(nets.segmenter, inner.images, inner.masks, device=device).dice.mean()
        )
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return {
        "site": site,
        "setting": setting,
        "seed": seed,
        "iterations": iterations,
        "pretrain_iterations": trainer.pretrain_steps,
        "overrides": [*SETTINGS[setting], *extra],
        "n_train": len(train),
        "n_val_used": len(val) if cfg.mlo.uses_validation else 0,
        "n_inner_eval": len(inner),
        "train_ids": list(train.ids),
        "dice": curve[iterations],
        "dice_curve": curve,
        "cpu_seconds": cpu,
        "wall_seconds": wall,
        "generator_check": trainer.generator_check() if len(val) else {},
        "last_stats": {k: v for k, v in stats.items() if not k.startswith("time_")},
    }


def cost_ratio(threads: int, iterations: int = 60) -> float:
    """CPU time per main iteration of DEFAULT over ``aug``, measured interleaved on PH2."""
    from bench.step_cost import build_trainers, time_interleaved

    variants = {"aug": SETTINGS["aug"], DEFAULT: SETTINGS[DEFAULT]}
    trainers = build_trainers(REPO / SITES["PH2"], "PH2", variants, [])
    for t in trainers.values():
        t.iteration = t.pretrain_steps
    timings = time_interleaved(trainers, iterations, blocks=3)
    return statistics.mean(timings[DEFAULT].cpu) / statistics.mean(timings["aug"].cpu)


def summarise(results: Sequence[Mapping[str, Any]], out: Path, meta: Mapping[str, Any]) -> str:
    """Per-site and pooled tables of Dice and CPU time, paired differences against ``aug``."""
    by: dict[tuple[str, str], dict[int, Mapping[str, Any]]] = {}
    for r in results:
        by.setdefault((r["site"], r["setting"]), {})[r["seed"]] = r
    sites = [s for s in SITES if any(k[0] == s for k in by)]
    settings = [s for s in SETTINGS if any(k[1] == s for k in by)]
    rows, summary = [], {}
    for setting in settings:
        row = [setting]
        pooled_a: dict[str, float] = {}  # site x seed pairs
        pooled_b: dict[str, float] = {}
        for site in sites:
            runs = by.get((site, setting), {})
            dice = [r["dice"] for r in runs.values()]
            row.append(f"{statistics.mean(dice):.3f}" if dice else "")
            ref = by.get((site, REFERENCE), {})
            for seed, r in runs.items():
                if seed in ref:
                    key = f"{site}:{seed}"
                    pooled_a[key], pooled_b[key] = r["dice"], ref[seed]["dice"]
        cpu = [r["cpu_seconds"] for (s, st), runs in by.items() if st == setting for r in runs.values()]
        ref_cpu = [r["cpu_seconds"] for (s, st), runs in by.items() if st == REFERENCE for r in runs.values()]
        est = paired_difference(pooled_a, pooled_b) if len(pooled_a) >= 2 and setting != REFERENCE else None
        row.append(ci(est) if est else "")
        row.append(f"{statistics.mean(cpu):.0f}" if cpu else "")
        row.append(f"{statistics.mean(cpu) / statistics.mean(ref_cpu):.2f}" if cpu and ref_cpu else "")
        rows.append(row)
        summary[setting] = {
            "dice": {site: [r["dice"] for r in by.get((site, setting), {}).values()] for site in sites},
            "difference_vs_aug": None if est is None else est.as_dict(),
            "cpu_seconds_mean": statistics.mean(cpu) if cpu else None,
        }
    header = [
        "setting",
        *[f"{s} Dice" for s in sites],
        f"Δ vs {REFERENCE} (95 % CI, site x seed pairs)",
        "CPU s / run",
        f"CPU × {REFERENCE}",
    ]
    table = markdown_table(header, rows)
    write_json({"meta": meta, "settings": summary}, out / "summary.json")
    (out / "tables.md").write_text(table + "\n")
    write_csv(
        [{k: v for k, v in r.items() if k not in ("train_ids", "dice_curve", "last_stats")} for r in results],
        out / "runs.csv",
    )
    _plot(by, sites, settings, out / "level3.png")
    return table


def _plot(
    by: Mapping[tuple[str, str], Mapping[int, Mapping[str, Any]]],
    sites: Sequence[str],
    settings: Sequence[str],
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sites), figsize=(3.2 * len(sites), 3.6), squeeze=False)
    for ax, site in zip(axes[0], sites, strict=True):
        for i, setting in enumerate(settings):
            dice = [r["dice"] for r in by.get((site, setting), {}).values()]
            ax.scatter([i] * len(dice), dice, s=12, alpha=0.7)
            if dice:
                ax.plot([i - 0.3, i + 0.3], [statistics.mean(dice)] * 2, color="k")
        ax.set_xticks(range(len(settings)), settings, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{site} (inner evaluation)", fontsize=9)
        ax.set_ylabel("Dice")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", nargs="+", default=list(SITES), choices=list(SITES))
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--iterations", type=int, default=600, help="main iterations per run (64 px)")
    ap.add_argument("--eval", type=int, default=36, help="inner evaluation images per site and seed")
    ap.add_argument(
        "--cost-ratio", type=float, default=None, help="CPU ratio genseg/aug for aug-eq (default: measure)"
    )
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/converged/level3")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()

    setup_runtime(args.threads)
    runs_dir = args.out / "runs"
    todo = [(site, st, seed) for st in args.settings for seed in args.seeds for site in args.sites]
    path_of = {k: runs_dir / k[0] / k[1] / f"seed{k[2]}" / "result.json" for k in todo}
    if args.dry_run:
        for k in todo:
            print("done " if path_of[k].is_file() else "to do", *k)
        return
    ratio_file = args.out / "cost_ratio.json"
    ratio = args.cost_ratio
    if ratio is None and "aug-eq" in args.settings:
        if ratio_file.is_file():
            ratio = json.loads(ratio_file.read_text())["ratio"]
        else:
            ratio = cost_ratio(args.threads)
            write_json({"ratio": ratio, "default": DEFAULT, "command": command_line()}, ratio_file)
    for k in todo:
        if path_of[k].is_file():
            continue
        site, setting, seed = k
        iterations = round(args.iterations * ratio) if setting == "aug-eq" else args.iterations
        result = run_one(site, setting, seed, iterations, args.eval, args.overrides)
        result["command"] = command_line()
        write_json(result, path_of[k])
        print(
            f"{site:10} {setting:15} seed {seed}: Dice {result['dice']:.3f}  CPU {result['cpu_seconds']:.0f} s",
            flush=True,
        )
    results = [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*/*/seed*/result.json"))]
    meta = {
        "command": command_line(),
        "machine": machine_info(args.threads),
        "iterations": args.iterations,
        "aug_eq_ratio": ratio,
    }
    print(summarise(results, args.out, meta))


if __name__ == "__main__":
    main()
