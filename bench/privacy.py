"""Privacy-utility study: FedAvg ``genseg`` at per-site epsilon in {1, 3, 8, inf}, over seeds and datasets.

    python bench/privacy.py --quick --threads 1     # skin, DermIS held out, N=9, 2 seeds, the quick size
    python bench/privacy.py --device auto           # full: skin (DermIS held out) + MNI152, 5 seeds
    python bench/privacy.py --quick --epsilons 3 inf --seeds 0 1 2

Each run is ``run_one`` of bench/privacy_utility.py (the same federated experiment with only the per-site
budget changed; ``inf`` = GenSeg-Fed without DP; noise calibrated so the planned rounds x local
iterations spend exactly the budget), here repeated over seeds with one result file per
``(dataset, epsilon, seed)`` under ``<out>/runs/<dataset>/privacy-eps<e>/n<N>/seed<S>/`` so a killed study
continues where it stopped. The quick size is the accuracy study's, so the ``inf`` rows are FedAvg genseg
of bench/accuracy.py. Writes ``<out>/privacy/``: ``runs.csv``, ``summary.csv``, ``summary.json``,
``tables.md`` and ``privacy_utility_<dataset>.png``.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    DATASETS,
    FULL,
    QUICK,
    RunKey,
    StudyOutput,
    experiment_overrides,
    finish_study,
    fmt,
    get_dataset,
    load_result,
    markdown_table,
    pm,
    run_lock,
    setup_runtime,
    study_meta,
    write_csv,
    write_json,
)
from bench.common import JOBS as _JOBS
from bench.stats import Estimate

EPSILONS = (1.0, 3.0, 8.0, math.inf)
QUICK_SEEDS = (0, 1)
QUICK_DATASETS = ("skin-loso-dermis",)
FULL_DATASETS = ("skin-loso-dermis", "mni152")
N = 9


def _tag(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def run_privacy(
    root: Path, dataset_name: str, size: Any, eps: float, seed: int, extra: Sequence[str]
) -> dict[str, Any] | None:
    """One ``(dataset, epsilon, seed)`` through bench/privacy_utility.py's ``run_one``; cached in its folder."""
    from bench.privacy_utility import run_one

    dataset = get_dataset(dataset_name)
    job = _JOBS["fedavg-genseg"]
    overrides = [*experiment_overrides(dataset, size, job, N, seed, extra)]
    overrides = [o for o in overrides if not o.startswith("federation.baselines=")]  # run_one turns them off
    key = RunKey(dataset.name, f"privacy-eps{_tag(eps)}", N, seed)
    done = load_result(root, key, overrides)
    if done is not None:
        return {**done, "epsilon": eps}  # JSON stored infinity as null
    folder = key.folder(root)
    with run_lock(folder) as mine:
        if not mine:
            return None
        for stale in ("checkpoint.pt", "sites"):  # run_one starts a fresh run: no half-done state
            path = folder / stale
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        row = run_one(eps, config=dataset.path, overrides=overrides, out=folder)
        result = {
            "dataset": dataset.name,
            "epsilon": eps,
            "n": N,
            "seed": seed,
            "run_overrides": overrides,
            "row": row,
            "seconds": row["seconds"],
        }
        write_json(result, folder / "result.json")
        return result


def summarise(results: Sequence[Mapping[str, Any]], out: Path) -> dict[str, Any]:
    rows, summary_rows, tables, summary = [], [], [], {}
    for r in results:
        row = r["row"]
        spent = [v for v in row["epsilon_spent"].values() if v is not None]
        noise = next(iter(row["noise_multipliers"].values()), {})
        rows.append(
            {
                "dataset": r["dataset"],
                "epsilon": _tag(r["epsilon"]),
                "seed": r["seed"],
                "dice_train_sites": row["dice_train_sites"],
                "dice_heldout": row["dice_heldout"],
                "epsilon_spent_max": max(spent) if spent else None,
                "sigma_seg": noise.get("seg"),
                "sigma_hyper": noise.get("hyper"),
                "declined": row["declined"],
                "seconds": row["seconds"],
            }
        )
    write_csv(rows, out / "runs.csv")
    for dataset in sorted({r["dataset"] for r in rows}):
        body = []
        for eps in sorted({r["epsilon"] for r in rows if r["dataset"] == dataset}, key=lambda e: float(e)):
            sel = [r for r in rows if r["dataset"] == dataset and r["epsilon"] == eps]
            train, held = (
                Estimate.of(r["dice_train_sites"] for r in sel),
                Estimate.of(r["dice_heldout"] for r in sel),
            )
            spent = Estimate.of(r["epsilon_spent_max"] for r in sel)
            sigma = Estimate.of(r["sigma_seg"] for r in sel)
            entry = {
                "train_mean": train.as_dict(),
                "heldout": held.as_dict(),
                "epsilon_spent": spent.as_dict(),
                "sigma": sigma.as_dict(),
                "seeds": sorted(r["seed"] for r in sel),
            }
            summary.setdefault(dataset, {})[eps] = entry
            summary_rows.append(
                {
                    "dataset": dataset,
                    "epsilon": eps,
                    "seeds": train.n,
                    "train_mean": train.mean,
                    "train_std": train.std,
                    "heldout_mean": held.mean,
                    "heldout_std": held.std,
                    "epsilon_spent": spent.mean,
                    "sigma_seg": sigma.mean,
                }
            )
            body.append(
                [
                    eps if eps != "inf" else "inf (no DP)",
                    pm(train),
                    pm(held),
                    fmt(spent.mean, 2) if spent.n else "–",
                    fmt(sigma.mean, 2) if sigma.n else "–",
                    train.n,
                ]
            )
        tables.append(
            f"### {dataset}: FedAvg genseg, N = {N}, per-site epsilon (delta 1e-5)\n\n"
            + markdown_table(
                [
                    "per-site epsilon",
                    "test Dice, training sites",
                    "test Dice, held-out",
                    "epsilon spent (max over sites)",
                    "noise multiplier sigma (levels I/II)",
                    "seeds",
                ],
                body,
            )
        )
        _plot(out / f"privacy_utility_{dataset}.png", dataset, summary[dataset])
    write_csv(summary_rows, out / "summary.csv")
    (out / "tables.md").write_text("\n\n".join(tables) + "\n")
    return summary


def _plot(path: Path, dataset: str, entries: Mapping[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = sorted(entries, key=float)
    x = list(range(len(eps)))
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for key, label in (("train_mean", "training sites (mean)"), ("heldout", "held-out site")):
        means = [entries[e][key]["mean"] for e in eps]
        stds = [
            0
            if entries[e][key]["std"] is None or math.isnan(entries[e][key]["std"])
            else entries[e][key]["std"]
            for e in eps
        ]
        ax.errorbar(x, means, yerr=stds, marker="o", capsize=3, label=label)
    ax.set_xticks(x, [("∞ (no DP)" if e == "inf" else e) for e in eps])
    ax.set_xlabel("per-site epsilon (delta 1e-5)")
    ax.set_ylabel("test Dice (mean ± std over seeds)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{dataset}: GenSeg-Fed privacy-utility")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=None)
    ap.add_argument("--epsilons", nargs="+", type=float, default=list(EPSILONS))
    ap.add_argument("--seeds", nargs="+", type=int, default=None)
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--out", type=Path, default=None, help="results folder (default bench/results/<quick|full>)"
    )
    args = ap.parse_args(argv)

    setup_runtime(args.threads)
    from tqdm.auto import tqdm

    size = QUICK if args.quick else FULL
    root = args.out or Path("bench/results") / size.name
    datasets = args.datasets or (QUICK_DATASETS if args.quick else FULL_DATASETS)
    seeds = args.seeds or (QUICK_SEEDS if args.quick else size.seeds)
    plan = [(d, e, s) for d in datasets for s in seeds for e in args.epsilons]
    started = time.perf_counter()
    meta = study_meta(size, args.threads)
    results = []
    for dataset, eps, seed in tqdm(plan, desc="privacy runs", dynamic_ncols=True):
        result = run_privacy(root, dataset, size, eps, seed, [f"device={args.device}", *args.extra])
        if result is not None:
            results.append(result)
    out = StudyOutput(root, "privacy").folder
    summary = summarise(results, out)
    finish_study(out, meta, started, results, summary)


if __name__ == "__main__":
    main()
