"""Accuracy study: every method x N x seed on the benchmark datasets; per-site and held-out test Dice.

    python bench/accuracy.py --quick --threads 1     # skin, DermIS held out, N=9, 3 seeds, 32 px, 2 x 20 it.
    python bench/accuracy.py --device auto           # full: 3 leave-one-site-out skin splits + MNI152,
                                                     # N in {9, 20, 50}, 5 seeds, the configs' own budget
    python bench/accuracy.py --datasets skin-loso-ph2 --ns 9 20 --seeds 0 1 2 3 --methods fedavg-seg-only fedavg-genseg

Methods: local-only (``local-seg-only`` and ``local-genseg``, trained at each site with the federation's
budget), FedAvg ``seg-only`` / ``aug`` / ``genseg``, FedProx ``genseg``, FedBN-style ``genseg`` and pooled
centralised ``seg-only`` / ``genseg`` (the federation's total budget in one place). Federated runs use the
real coordinator and ClientApp through the in-process transport (see bench/common.py). Every run has its
own result file under ``<out>/runs``; run the same command again to continue a killed study.

Writes ``<out>/accuracy/``: ``runs.csv`` (one row per dataset, method, N, seed, site), ``summary.csv``
(mean ± std over seeds), ``paired.csv`` (per-seed differences against FedAvg seg-only, 95% t CI),
``summary.json``, ``tables.md`` and a PNG per dataset and N.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    DATASETS,
    METHODS,
    QUICK,
    REFERENCE,
    SIZES,
    Estimate,
    StudyOutput,
    ci,
    finish_study,
    get_dataset,
    jobs_for,
    markdown_table,
    method_rows,
    paired_difference,
    per_seed_scores,
    pm,
    run_grid,
    setup_runtime,
    study_meta,
    write_csv,
)

QUICK_DATASETS = ("skin-loso-dermis",)
FULL_DATASETS = ("skin-loso-dermis", "skin-loso-ph2", "skin-loso-dermquest", "mni152")


def summarise(
    results: Sequence[Mapping[str, Any]], out: Path, *, methods: Sequence[str], per_volume: bool = False
) -> dict[str, Any]:
    """Tables, CSVs and plots of the accuracy study from finished run results; returns the summary.

    ``per_volume``: the same from per-volume Dice (datasets of volumes only), into ``out``.
    """
    out.mkdir(parents=True, exist_ok=True)
    rows = method_rows(results, per_volume=per_volume)
    write_csv(rows, out / "runs.csv")
    scores = per_seed_scores(rows)
    sites_of = {r["dataset"]: r["sites"] for r in results}
    summary_rows, paired_rows, tables = [], [], []
    summary: dict[str, Any] = {}
    for dataset in sorted({d for d, _, _ in scores}):
        sites = sites_of[dataset]
        for n in sorted({n for d, _, n in scores if d == dataset}):
            key_rows = []
            ref = scores.get((dataset, REFERENCE, n), {})
            for method in [m for m in methods if (dataset, m, n) in scores]:
                per_seed = scores[(dataset, method, n)]
                cols = {
                    c: Estimate.of(s.get(c, math.nan) for s in per_seed.values())
                    for c in [*sites["train"], *sites["heldout"], "train_mean", "heldout"]
                }
                diff_train = paired_difference(
                    {k: v["train_mean"] for k, v in per_seed.items()},
                    {k: v["train_mean"] for k, v in ref.items()},
                )
                diff_held = paired_difference(
                    {k: v["heldout"] for k, v in per_seed.items()}, {k: v["heldout"] for k, v in ref.items()}
                )
                entry = {
                    "dataset": dataset,
                    "method": method,
                    "n": n,
                    "seeds": sorted(per_seed),
                    **{f"dice_{c}": e.as_dict() for c, e in cols.items()},
                    "diff_vs_reference_train_mean": diff_train.as_dict(),
                    "diff_vs_reference_heldout": diff_held.as_dict(),
                }
                summary.setdefault(dataset, {}).setdefault(str(n), {})[method] = entry
                summary_rows.append(
                    {
                        "dataset": dataset,
                        "method": method,
                        "n": n,
                        "seeds": len(per_seed),
                        **{f"{c}_mean": e.mean for c, e in cols.items()},
                        **{f"{c}_std": e.std for c, e in cols.items()},
                    }
                )
                if method != REFERENCE:
                    for target, est in (("train_mean", diff_train), ("heldout", diff_held)):
                        paired_rows.append(
                            {
                                "dataset": dataset,
                                "method": method,
                                "reference": REFERENCE,
                                "n": n,
                                "target": target,
                                "seeds": est.n,
                                "diff_mean": est.mean,
                                "diff_std": est.std,
                                "ci95_lo": est.lo,
                                "ci95_hi": est.hi,
                            }
                        )
                key_rows.append(
                    [
                        method,
                        *[pm(cols[s]) for s in sites["train"]],
                        pm(cols["train_mean"]),
                        *[pm(cols[s]) for s in sites["heldout"]],
                        "(reference)" if method == REFERENCE else ci(diff_train),
                        "(reference)" if method == REFERENCE else ci(diff_held),
                    ]
                )
            header = [
                "method",
                *sites["train"],
                "mean (training sites)",
                *[f"{s} (held-out)" for s in sites["heldout"]],
                f"Δ mean vs {REFERENCE} [95% CI]",
                f"Δ held-out vs {REFERENCE} [95% CI]",
            ]
            seeds = sorted({s for (d, _, nn), v in scores.items() if d == dataset and nn == n for s in v})
            tables.append(
                f"### {dataset}, N = {n} labelled training images per site, seeds {seeds}\n\n"
                f"Test Dice{' per volume' if per_volume else ''}, mean ± std over seeds; "
                "Δ = mean of per-seed paired differences.\n\n" + markdown_table(header, key_rows)
            )
            _plot(out / f"accuracy_{dataset}_n{n}.png", dataset, n, sites, scores, methods)
    write_csv(summary_rows, out / "summary.csv")
    write_csv(paired_rows, out / "paired.csv")
    (out / "tables.md").write_text("\n\n".join(tables) + "\n")
    return summary


def _plot(
    path: Path, dataset: str, n: int, sites: Mapping[str, list[str]], scores: Mapping, methods: Sequence[str]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    present = [m for m in methods if (dataset, m, n) in scores]
    columns = [*sites["train"], "train_mean", *sites["heldout"]]
    labels = [*sites["train"], "mean (train)", *[f"{s}\n(held-out)" for s in sites["heldout"]]]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / max(1, len(present))
    for i, method in enumerate(present):
        per_seed = scores[(dataset, method, n)]
        est = [Estimate.of(s.get(c, math.nan) for s in per_seed.values()) for c in columns]
        x = np.arange(len(columns)) + (i - (len(present) - 1) / 2) * width
        ax.bar(
            x,
            [e.mean for e in est],
            width,
            yerr=[0 if math.isnan(e.std) else e.std for e in est],
            label=method,
            capsize=2,
        )
    ax.set_xticks(np.arange(len(columns)), labels)
    ax.set_ylabel("test Dice (mean ± std over seeds)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{dataset}, N = {n}")
    ax.legend(fontsize=7, ncol=2)
    ref = scores.get((dataset, REFERENCE, n), {})
    others = [m for m in present if m != REFERENCE]
    for j, target in enumerate(("train_mean", "heldout")):
        ests = [
            paired_difference(
                {k: v[target] for k, v in scores[(dataset, m, n)].items()},
                {k: v[target] for k, v in ref.items()},
            )
            for m in others
        ]
        y = np.arange(len(others)) + (0.18 if j else -0.18)
        err = [
            [e.mean - e.lo if e.n > 1 else 0 for e in ests],
            [e.hi - e.mean if e.n > 1 else 0 for e in ests],
        ]
        ax2.errorbar(
            [e.mean for e in ests],
            y,
            xerr=err,
            fmt="o",
            capsize=3,
            label="mean of training sites" if not j else "held-out site",
        )
    ax2.axvline(0, color="grey", lw=0.8)
    ax2.set_yticks(np.arange(len(others)), others)
    ax2.set_xlabel(f"Δ test Dice vs {REFERENCE} (per-seed paired, 95% CI)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the < 20 min size on 2 CPU cores (= --size quick)")
    ap.add_argument(
        "--size", choices=sorted(SIZES), default="full", help="quick | medium | full (see bench/common.py)"
    )
    ap.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=None)
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--ns", nargs="+", type=int, default=None, help="labelled training images per site")
    ap.add_argument("--seeds", nargs="+", type=int, default=None)
    ap.add_argument(
        "--set", dest="extra", action="append", default=[], metavar="KEY=VALUE", help="extra config override"
    )
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 on a loaded 2-core machine)")
    ap.add_argument(
        "--out", type=Path, default=None, help="results folder (default bench/results/<quick|full>)"
    )
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    ap.add_argument("--dry-run", action="store_true", help="print the runs (done / to do) and stop")
    args = ap.parse_args(argv)

    setup_runtime(args.threads)
    size = QUICK if args.quick else SIZES[args.size]
    root = args.out or Path("bench/results") / size.name
    datasets = [
        get_dataset(d) for d in (args.datasets or (QUICK_DATASETS if size.name != "full" else FULL_DATASETS))
    ]
    methods = [m for m in METHODS if m in args.methods]
    if REFERENCE not in methods:
        methods.insert(0, REFERENCE)  # paired differences need it
    started = time.perf_counter()
    meta = study_meta(size, args.threads)
    if args.dry_run:
        run_grid(
            root,
            datasets,
            size,
            jobs_for(methods),
            args.ns or size.ns,
            args.seeds or size.seeds,
            dry_run=True,
        )
        return
    results = run_grid(
        root,
        datasets,
        size,
        jobs_for(methods),
        args.ns or size.ns,
        args.seeds or size.seeds,
        extra=[f"device={args.device}", *args.extra],
        progress=args.progress,
    )
    out = StudyOutput(root, "accuracy").folder
    summary = summarise(results, out, methods=methods)
    if any("methods_per_volume" in r for r in results):
        summary = {
            "per_image": summary,
            "per_volume": summarise(results, out / "per_volume", methods=methods, per_volume=True),
        }
    finish_study(out, meta, started, results, summary)


if __name__ == "__main__":
    main()
