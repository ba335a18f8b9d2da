"""Data-efficiency study: test Dice against N (labelled images per site) and the data-efficiency factor.

    python bench/data_efficiency.py --quick --threads 1            # smoke run: skin, DermIS held out, N in {9, 20, 50}
    python bench/data_efficiency.py --size converged --threads 1   # headline: 3 skin splits, N in {9, 20, 50}, 8 seeds
    python bench/data_efficiency.py --size converged --others-at-base-only   # other methods only at N = 9

N counts labelled images per site (training + validation; methods without level III train on the
validation images) and each seed resamples which ones, with nested sets as N grows (bench/common.py).
The **data-efficiency factor** is the smallest N at which FedAvg ``seg-only`` matches FedAvg ``genseg`` at
N = 9 (mean over seeds), divided by 9: the published GenSeg claims (8-20x less labelled data) are this
number. It is given on the N grid and linearly interpolated between grid points, per seed (seeds are
paired: same initialisation, batches and labelled images), and with a percentile bootstrap interval over
seeds (bench/stats.py, ``scipy.stats.bootstrap``). A factor of 1 means seg-only at N = 9 already matches
genseg; "> x" means seg-only never reached it up to the largest N. Computed for the mean test Dice of the
training sites and for the held-out site. A split whose smallest training site has fewer labelled images
than N skips that N (DermIS has 48 outside its test split, so N = 50 runs only with DermIS held out).

Runs are shared with bench/accuracy.py (same ``--out`` folder, same size): a run either study already did
is not repeated. Writes ``<out>/data_efficiency/``: ``curves.csv``, ``factor.csv``, ``summary.json``,
``tables.md`` and ``data_efficiency_<dataset>.png``.
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
    GENSEG,
    METHODS,
    QUICK,
    REFERENCE,
    SIZES,
    StudyOutput,
    check_plan,
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
from bench.stats import Estimate, efficiency_factor

QUICK_NS = (9, 20, 50)
QUICK_DATASETS = ("skin-loso-dermis",)
FULL_DATASETS = ("skin-loso-dermis", "skin-loso-ph2", "skin-loso-dermquest")
BASE_N = 9
TARGETS = {"train_mean": "mean test Dice of the training sites", "heldout": "test Dice on the held-out site"}


def factor_text(f: Mapping[str, Any]) -> str:
    """``2.2x (grid 2.2x; per seed 1.0, 2.2, 5.6; bootstrap 1.0-5.6)``, or the censored form."""
    if f.get("interpolated") is None:
        bound = f.get("lower_bound")
        return f"> {fmt(bound, 1)}x (never reached up to N = {max(f['ns']) if f['ns'] else '?'})"
    seeds = ", ".join("n/r" if v is None else f"{v:.1f}" for v in f["per_seed"].values())
    boot = f.get("bootstrap") or {}
    censored = (
        f" ({boot['censored']} of {boot['draws']} draws censored at the largest N)"
        if boot.get("censored")
        else ""
    )
    return (
        f"{f['interpolated']:.1f}x (grid {f['grid']:.1f}x; per seed {seeds}; "
        f"bootstrap 95% {boot.get('lo', math.nan):.1f}-{boot.get('hi', math.nan):.1f}x{censored})"
    )


def summarise(
    results: Sequence[Mapping[str, Any]], out: Path, *, methods: Sequence[str], size_label: str = ""
) -> dict[str, Any]:
    """Curves, factors, tables and plots from finished run results (``size_label``: in plot titles)."""
    scores = per_seed_scores(method_rows(results))
    curve_rows, factor_rows, tables = [], [], []
    summary: dict[str, Any] = {}
    for dataset in sorted({d for d, _, _ in scores}):
        ns = sorted({n for d, _, n in scores if d == dataset})
        lines = []
        for target, label in TARGETS.items():
            for method in [m for m in methods if any((dataset, m, n) in scores for n in ns)]:
                for n in ns:
                    if (dataset, method, n) not in scores:
                        continue
                    est = Estimate.of(s[target] for s in scores[(dataset, method, n)].values())
                    curve_rows.append(
                        {
                            "dataset": dataset,
                            "target": target,
                            "method": method,
                            "n": n,
                            "seeds": est.n,
                            "mean": est.mean,
                            "std": est.std,
                        }
                    )
            ref_curve = {
                n: {s: v[target] for s, v in scores[(dataset, REFERENCE, n)].items()}
                for n in ns
                if (dataset, REFERENCE, n) in scores
            }
            base = scores.get((dataset, GENSEG, BASE_N))
            if not base or not ref_curve:
                continue
            goal = {s: v[target] for s, v in base.items()}
            f = efficiency_factor(ref_curve, goal, BASE_N)
            f["target_dice"] = Estimate.of(goal.values()).as_dict()
            summary.setdefault(dataset, {})[target] = f
            factor_rows.append(
                {
                    "dataset": dataset,
                    "target": target,
                    "genseg_n9_mean": f["target_dice"]["mean"],
                    "factor_grid": f["grid"],
                    "factor_interpolated": f["interpolated"],
                    "lower_bound_if_not_reached": f["lower_bound"],
                    "bootstrap_lo": (f["bootstrap"] or {}).get("lo"),
                    "bootstrap_hi": (f["bootstrap"] or {}).get("hi"),
                    "seeds": len(f["seeds"]),
                }
            )
            lines.append(
                f"- **{label}**: FedAvg genseg at N = {BASE_N}: {pm(Estimate.of(goal.values()))}; data-efficiency factor {factor_text(f)}"
            )
        header = ["method", *[f"N = {n}" for n in ns]]
        body = []
        for target, label in TARGETS.items():
            body.append([f"*{label}*", *["" for _ in ns]])
            for method in [m for m in methods if any((dataset, m, n) in scores for n in ns)]:
                body.append(
                    [
                        method,
                        *[
                            pm(Estimate.of(s[target] for s in scores[(dataset, method, n)].values()))
                            if (dataset, method, n) in scores
                            else "–"
                            for n in ns
                        ],
                    ]
                )
        tables.append(
            f"### {dataset}: test Dice against N (mean ± std over seeds)\n\n"
            + markdown_table(header, body)
            + "\n\n"
            + "\n".join(lines)
        )
        _plot(
            out / f"data_efficiency_{dataset}.png",
            dataset,
            ns,
            scores,
            methods,
            summary.get(dataset, {}),
            label,
        )
    write_csv(curve_rows, out / "curves.csv")
    write_csv(factor_rows, out / "factor.csv")
    (out / "tables.md").write_text("\n\n".join(tables) + "\n")
    return summary


def _plot(
    path: Path,
    dataset: str,
    ns: Sequence[int],
    scores: Mapping,
    methods: Sequence[str],
    factors: Mapping[str, Any],
    size_label: str = "",
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (target, label) in zip(axes, TARGETS.items(), strict=True):
        for method in methods:
            xs = [n for n in ns if (dataset, method, n) in scores]
            if not xs:
                continue
            est = [Estimate.of(s[target] for s in scores[(dataset, method, n)].values()) for n in xs]
            ax.errorbar(
                xs,
                [e.mean for e in est],
                yerr=[0 if math.isnan(e.std) else e.std for e in est],
                marker="o",
                capsize=3,
                label=method,
            )
        f = factors.get(target)
        if f:
            ax.axhline(
                f["target_dice"]["mean"], ls="--", color="grey", lw=0.8, label=f"{GENSEG} at N = {BASE_N}"
            )
            if f.get("interpolated") is not None:
                ax.axvline(f["interpolated"] * BASE_N, ls=":", color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xticks(list(ns), [str(n) for n in ns])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("labelled images per site (N, training + validation)")
        ax.set_title(label)
    axes[0].set_ylabel("test Dice (mean ± std over seeds)")
    axes[0].legend(fontsize=7)
    fig.suptitle(dataset + (f" ({size_label})" if size_label else ""))
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
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=[REFERENCE, GENSEG])
    ap.add_argument("--ns", nargs="+", type=int, default=None)
    ap.add_argument("--seeds", nargs="+", type=int, default=None)
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/<size>)")
    ap.add_argument(
        "--others-at-base-only",
        action="store_true",
        help=f"run methods other than {REFERENCE} only at N = {BASE_N} (enough for the factor; cheaper)",
    )
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    ap.add_argument("--dry-run", action="store_true", help="print the runs (done / to do) and stop")
    args = ap.parse_args(argv)

    setup_runtime(args.threads)
    size = QUICK if args.quick else SIZES[args.size]
    root = args.out or Path("bench/results") / size.name
    small = size.name in ("quick", "medium")
    datasets = [get_dataset(d) for d in (args.datasets or (QUICK_DATASETS if small else FULL_DATASETS))]
    methods = list(dict.fromkeys([REFERENCE, GENSEG, *args.methods]))
    ns = sorted(set(args.ns or (QUICK_NS if small else size.ns)) | {BASE_N})
    started = time.perf_counter()
    meta = study_meta(size, args.threads)
    extra = [f"device={args.device}", *args.extra]
    check_plan(datasets, size, jobs_for(methods), extra)
    seeds = args.seeds or size.seeds
    if args.dry_run:
        run_grid(root, datasets, size, jobs_for(methods), ns, seeds, dry_run=True)
        return
    if args.others_at_base_only:  # the reference curve over N, every other method only at N = 9
        results = run_grid(
            root, datasets, size, jobs_for([REFERENCE]), ns, seeds, extra=extra, progress=args.progress
        )
        others = [m for m in methods if m not in jobs_for([REFERENCE])[0].yields]
        results += run_grid(
            root, datasets, size, jobs_for(others), [BASE_N], seeds, extra=extra, progress=args.progress
        )
    else:
        results = run_grid(
            root, datasets, size, jobs_for(methods), ns, seeds, extra=extra, progress=args.progress
        )
    shown = [m for m in METHODS if m in {m for r in results for m in r["methods"]}]
    out = StudyOutput(root, "data_efficiency").folder
    summary = summarise(results, out, methods=shown, size_label=size.name)
    finish_study(out, meta, started, results, summary)


if __name__ == "__main__":
    main()
