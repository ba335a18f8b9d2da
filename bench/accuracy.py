"""Accuracy study: every method x N x seed on the benchmark datasets; per-site and held-out test Dice.

    python bench/accuracy.py --quick --threads 1     # smoke run: skin, DermIS held out, N=9, 3 seeds, 32 px
    python bench/accuracy.py --size converged --threads 1
                                                     # headline: 3 leave-one-site-out skin splits, N in
                                                     # {9, 20, 50}, 8 seeds, 64 px, CONVERGED_BUDGET
    python bench/accuracy.py --size converged --ns 9 --methods fedavg-seg-only-classic fedavg-genseg

Methods (bench/common.py JOBS): local-only (``local-*``, trained at each site with the federation's
budget), FedAvg ``seg-only`` with and without classic augmentation (``augment.classic``), FedAvg ``aug``
and ``genseg``, FedProx ``genseg``, FedBN-style ``genseg``, and pooled centralised ``seg-only`` (with and
without classic augmentation) and ``genseg`` (the federation's total budget in one place). N counts
labelled images per site (training + validation; methods without level III train on the validation
images) and every seed resamples which ones (see bench/common.py). Federated runs use the real coordinator
and ClientApp through the in-process transport. Every run has its own result file under ``<out>/runs``;
run the same command again to continue a killed study.

Statistics (bench/stats.py): mean ± std over seeds; Δ = mean of per-seed paired differences against
FedAvg seg-only and against FedAvg seg-only + classic augmentation with a 95 % t interval; on the
leave-one-site-out splits, Bonferroni-adjusted intervals and Holm-adjusted p-values across the splits.
Cost: training CPU time per method (all sites) and its ratio to FedAvg seg-only.

Writes ``<out>/accuracy/``: ``runs.csv`` (one row per dataset, method, N, seed, site), ``summary.csv``
(mean ± std over seeds), ``paired.csv`` (paired differences), ``across_splits.csv``, ``cost.csv``,
``summary.json``, ``tables.md`` and a PNG per dataset and N; ``iou/`` the same tables in IoU (Jaccard,
the GenSeg paper's metric) and, for volume datasets, ``per_volume/``.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    CLASSIC_REFERENCE,
    DATASETS,
    METHODS,
    QUICK,
    REFERENCE,
    SIZES,
    StudyOutput,
    check_plan,
    ci,
    finish_study,
    fmt,
    get_dataset,
    jobs_for,
    markdown_table,
    method_rows,
    per_seed_scores,
    pm,
    run_grid,
    setup_runtime,
    study_meta,
    write_csv,
)
from bench.stats import Estimate, across_splits, paired_difference

QUICK_DATASETS = ("skin-loso-dermis",)
FULL_DATASETS = ("skin-loso-dermis", "skin-loso-ph2", "skin-loso-dermquest")
TARGETS = {"train_mean": "mean of the training sites", "heldout": "held-out site"}


def _diff(scores: Mapping, dataset: str, method: str, ref: str, n: int, target: str) -> Estimate:
    a = scores.get((dataset, method, n), {})
    b = scores.get((dataset, ref, n), {})
    return paired_difference({k: v[target] for k, v in a.items()}, {k: v[target] for k, v in b.items()})


def cost_rows(results: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> list[dict[str, Any]]:
    """Per (dataset, N, method): training CPU and wall seconds (all sites, mean over seeds), the per-seed
    paired CPU ratio to FedAvg seg-only, and the CPU / wall time of the whole runs that produced it."""
    per: dict[tuple[str, int, str], dict[int, Mapping[str, float]]] = {}
    runs: dict[tuple[str, int, str], list[Mapping[str, Any]]] = {}
    for r in results:
        for method, cost in r.get("cost", {}).items():
            per.setdefault((r["dataset"], r["n"], method), {})[r["seed"]] = cost
            runs.setdefault((r["dataset"], r["n"], method), []).append(r)
    rows = []
    for dataset, n in sorted({(d, n) for d, n, _ in per}):
        ref = per.get((dataset, n, REFERENCE), {})
        for method in [m for m in methods if (dataset, n, m) in per]:
            costs = per[(dataset, n, method)]
            cpu = Estimate.of(c.get("train_cpu_seconds") for c in costs.values())
            ratio = Estimate.of(
                costs[s]["train_cpu_seconds"] / ref[s]["train_cpu_seconds"]
                for s in costs
                if s in ref and ref[s].get("train_cpu_seconds")
            )
            rows.append(
                {
                    "dataset": dataset,
                    "n": n,
                    "method": method,
                    "seeds": cpu.n,
                    "train_cpu_seconds": cpu.mean,
                    "train_wall_seconds": Estimate.of(c.get("train_seconds") for c in costs.values()).mean,
                    "cpu_ratio_to_reference": ratio.mean,
                    "run_cpu_seconds": Estimate.of(
                        r.get("cpu_seconds") for r in runs[(dataset, n, method)]
                    ).mean,
                    "run_wall_seconds": Estimate.of(
                        r.get("seconds") for r in runs[(dataset, n, method)]
                    ).mean,
                }
            )
    return rows


def summarise(
    results: Sequence[Mapping[str, Any]],
    out: Path,
    *,
    methods: Sequence[str],
    per_volume: bool = False,
    iou: bool = False,
    size_label: str = "",
) -> dict[str, Any]:
    """Tables, CSVs and plots of the accuracy study from finished run results; returns the summary.

    ``per_volume``: the same from per-volume Dice (datasets of volumes only), into ``out``;
    ``iou``: from the IoU (Jaccard index, the GenSeg paper's metric) of the same models.
    ``size_label``: the size, shown in every plot title (a quick plot says so).
    """
    out.mkdir(parents=True, exist_ok=True)
    rows = method_rows(results, per_volume=per_volume, iou=iou)
    metric = "IoU (Jaccard)" if iou else "Dice"
    write_csv(rows, out / "runs.csv")
    scores = per_seed_scores(rows)
    sites_of = {r["dataset"]: r["sites"] for r in results}
    references = [m for m in (REFERENCE, CLASSIC_REFERENCE) if m in methods]
    summary_rows, paired_rows, tables = [], [], []
    summary: dict[str, Any] = {}
    for dataset in sorted({d for d, _, _ in scores}):
        sites = sites_of[dataset]
        for n in sorted({n for d, _, n in scores if d == dataset}):
            key_rows = []
            for method in [m for m in methods if (dataset, m, n) in scores]:
                per_seed = scores[(dataset, method, n)]
                cols = {
                    c: Estimate.of(s.get(c, math.nan) for s in per_seed.values())
                    for c in [*sites["train"], *sites["heldout"], "train_mean", "heldout"]
                }
                diffs = {
                    (ref, target): _diff(scores, dataset, method, ref, n, target)
                    for ref in references
                    for target in TARGETS
                    if (dataset, ref, n) in scores
                }
                entry = {
                    "dataset": dataset,
                    "method": method,
                    "n": n,
                    "seeds": sorted(per_seed),
                    **{f"dice_{c}": e.as_dict() for c, e in cols.items()},
                    **{f"diff_vs_{ref}_{target}": e.as_dict() for (ref, target), e in diffs.items()},
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
                for (ref, target), est in diffs.items():
                    if method != ref:
                        paired_rows.append(
                            {
                                "dataset": dataset,
                                "method": method,
                                "reference": ref,
                                "n": n,
                                "target": target,
                                "seeds": est.n,
                                "diff_mean": est.mean,
                                "diff_std": est.std,
                                "ci95_lo": est.lo,
                                "ci95_hi": est.hi,
                                "p": est.p,
                            }
                        )
                key_rows.append(
                    [
                        method,
                        *[pm(cols[s]) for s in sites["train"]],
                        pm(cols["train_mean"]),
                        *[pm(cols[s]) for s in sites["heldout"]],
                        *[
                            "(reference)" if method == ref else ci(diffs[(ref, target)])
                            for ref in references
                            if (ref, "train_mean") in diffs
                            for target in TARGETS
                        ],
                    ]
                )
            header = [
                "method",
                *sites["train"],
                "mean (training sites)",
                *[f"{s} (held-out)" for s in sites["heldout"]],
                *[
                    f"Δ {'mean' if target == 'train_mean' else 'held-out'} vs {ref} [95% CI]"
                    for ref in references
                    if (dataset, ref, n) in scores
                    for target in TARGETS
                ],
            ]
            seeds = sorted({s for (d, _, nn), v in scores.items() if d == dataset and nn == n for s in v})
            tables.append(
                f"### {dataset}, N = {n} labelled images per site (training + validation), seeds {seeds}\n\n"
                f"Test {metric}{' per volume' if per_volume else ''}, mean ± std over seeds; "
                "Δ = mean of per-seed paired differences, 95 % t interval.\n\n"
                + markdown_table(header, key_rows)
            )
            _plot(out / f"accuracy_{dataset}_n{n}.png", dataset, n, sites, scores, methods, size_label)
    family_rows, family_tables = across_split_tables(results, scores, methods, references)
    cost = [] if per_volume or iou else cost_rows(results, methods)
    if cost:
        tables.append(cost_table(cost))
    write_csv(summary_rows, out / "summary.csv")
    write_csv(paired_rows, out / "paired.csv")
    write_csv(family_rows, out / "across_splits.csv")
    write_csv(cost, out / "cost.csv")
    (out / "tables.md").write_text("\n\n".join([*tables, *family_tables]) + "\n")
    summary["_across_splits"] = family_rows
    summary["_cost"] = cost
    return summary


def across_split_tables(
    results: Sequence[Mapping[str, Any]],
    scores: Mapping,
    methods: Sequence[str],
    references: Sequence[str],
) -> tuple[list[dict[str, Any]], list[str]]:
    """Each method against each reference on every leave-one-site-out split of a family, corrected for
    the number of splits: Bonferroni intervals (simultaneous 95 %) and Holm-adjusted p-values."""
    from bench.common import DATASETS

    families: dict[str, list[str]] = {}
    for dataset in sorted({d for d, _, _ in scores}):
        family = DATASETS[dataset].family if dataset in DATASETS else ""
        if family:
            families.setdefault(family, []).append(dataset)
    rows, tables = [], []
    for family, datasets in families.items():
        if len(datasets) < 2:
            continue
        for n in sorted({n for d, _, n in scores if d in datasets}):
            body = []
            for ref in references:
                for method in [m for m in methods if m != ref]:
                    for target, label in TARGETS.items():
                        per = {
                            d: {k: v[target] for k, v in scores[(d, method, n)].items()}
                            for d in datasets
                            if (d, method, n) in scores
                        }
                        base = {
                            d: {k: v[target] for k, v in scores[(d, ref, n)].items()}
                            for d in datasets
                            if (d, ref, n) in scores
                        }
                        corrected = across_splits(per, base)
                        if not corrected:
                            continue
                        cells = []
                        for d in datasets:
                            c = corrected.get(d)
                            if c is None:
                                cells.append("–")
                                continue
                            cells.append(f"{ci(c['bonferroni'])} (Holm p {fmt(c['p_holm'], 3)})")
                            rows.append(
                                {
                                    "family": family,
                                    "dataset": d,
                                    "n": n,
                                    "method": method,
                                    "reference": ref,
                                    "target": target,
                                    "splits": c["m"],
                                    "diff_mean": c["estimate"].mean,
                                    "ci95_lo": c["estimate"].lo,
                                    "ci95_hi": c["estimate"].hi,
                                    "p": c["estimate"].p,
                                    "bonferroni_lo": c["bonferroni"].lo,
                                    "bonferroni_hi": c["bonferroni"].hi,
                                    "bonferroni_confidence": c["bonferroni"].confidence,
                                    "p_holm": c["p_holm"],
                                }
                            )
                        body.append([f"{method} − {ref}", label, *cells])
            if body:
                tables.append(
                    f"### {family}: all splits, N = {n}\n\n"
                    "Δ test Dice (paired by seed) with **Bonferroni-adjusted** intervals (each at "
                    f"1 − 0.05 / {len(datasets)}, so all splits' intervals cover together with 95 %) and "
                    "**Holm-adjusted** p-values across the splits.\n\n"
                    + markdown_table(["comparison", "target", *datasets], body)
                )
    return rows, tables


def cost_table(rows: Sequence[Mapping[str, Any]]) -> str:
    body = [
        [
            r["dataset"],
            r["n"],
            r["method"],
            fmt(r["train_cpu_seconds"], 1),
            fmt(r["cpu_ratio_to_reference"], 2),
            fmt(r["train_wall_seconds"], 1),
            fmt(r["run_cpu_seconds"], 1),
            fmt(r["run_wall_seconds"], 1),
        ]
        for r in rows
    ]
    return (
        "### Cost\n\nTraining time of each method summed over its training sites (process CPU time, "
        "`time.process_time()` around the training on site; mean over seeds), its per-seed ratio to "
        f"{REFERENCE}, and the CPU / wall time of the whole run that produced it (a federated run trains "
        "its local-only models too, and evaluates every round).\n\n"
        + markdown_table(
            [
                "dataset",
                "N",
                "method",
                "training CPU s",
                f"× {REFERENCE} (CPU)",
                "training wall s",
                "run CPU s",
                "run wall s",
            ],
            body,
        )
    )


def _plot(
    path: Path,
    dataset: str,
    n: int,
    sites: Mapping[str, list[str]],
    scores: Mapping,
    methods: Sequence[str],
    size_label: str = "",
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
    ax.set_title(f"{dataset}, N = {n}" + (f" ({size_label})" if size_label else ""))
    ax.legend(fontsize=7, ncol=2)
    # against the headline reference (FedAvg seg-only + classic augmentation) when it ran
    reference = CLASSIC_REFERENCE if (dataset, CLASSIC_REFERENCE, n) in scores else REFERENCE
    ref = scores.get((dataset, reference, n), {})
    others = [m for m in present if m != reference]
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
    ax2.set_xlabel(f"Δ test Dice vs {reference} (per-seed paired, 95% CI)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the < 20 min size on 2 CPU cores (= --size quick)")
    ap.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="converged",
        help="quick | medium | converged | full (see bench/common.py SIZES)",
    )
    ap.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=None)
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument(
        "--ns", nargs="+", type=int, default=None, help="labelled images per site (training + validation)"
    )
    ap.add_argument("--seeds", nargs="+", type=int, default=None)
    ap.add_argument(
        "--set", dest="extra", action="append", default=[], metavar="KEY=VALUE", help="extra config override"
    )
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 on a loaded 2-core machine)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/<size>)")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    ap.add_argument("--dry-run", action="store_true", help="print the runs (done / to do) and stop")
    args = ap.parse_args(argv)

    setup_runtime(args.threads)
    size = QUICK if args.quick else SIZES[args.size]
    root = args.out or Path("bench/results") / size.name
    small = size.name in ("quick", "medium")
    datasets = [get_dataset(d) for d in (args.datasets or (QUICK_DATASETS if small else FULL_DATASETS))]
    methods = [m for m in METHODS if m in args.methods]
    if REFERENCE not in methods:
        methods.insert(0, REFERENCE)  # paired differences need it
    check_plan(datasets, size, jobs_for(methods), [f"device={args.device}", *args.extra])
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
    summary = summarise(results, out, methods=methods, size_label=size.name)
    # the same models scored by IoU (Jaccard), the GenSeg paper's metric, for its reference rows
    summary = {
        "per_image": summary,
        "iou": summarise(results, out / "iou", methods=methods, iou=True, size_label=size.name),
    }
    if any("methods_per_volume" in r for r in results):
        summary["per_volume"] = summarise(
            results, out / "per_volume", methods=methods, per_volume=True, size_label=size.name
        )
    finish_study(out, meta, started, results, summary)


if __name__ == "__main__":
    main()
