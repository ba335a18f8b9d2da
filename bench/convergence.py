"""Convergence study: is FedAvg seg-only trained to convergence at the headline budget?

    python bench/convergence.py --quick --threads 1    # smoke run: 32 px, DermIS held out, N = 9, 1 seed
    python bench/convergence.py --threads 1            # the curves behind CONVERGED_BUDGET: 64 px, the 3
                                                       # skin splits, N in {9, 50}, 3 seeds, 3x the budget

FedAvg ``seg-only`` with and without classic augmentation (``augment.classic``) trains for ``--factor``
times the rounds of ``CONVERGED_BUDGET`` (bench/common.py) with its local iterations per round, and the
global model is scored after **every** round. The curve is test Dice against cumulative local iterations
per site (and epochs: iterations x batch size / N).

**No test image is used.** As in bench/tune.py, each training site's test split is removed first and
the federation runs on the rest, with its own split (``split_seed = 1``, 30 % inner validation); the
curves are Dice on that inner validation split; the held-out site is not used. So choosing the budget
from these curves leaks nothing into the headline tables.

**Plateau.** For each curve (mean over seeds) the plateau is the smallest budget after which the Dice
never rises by more than ``--delta`` (0.01) any more. The study says whether ``CONVERGED_BUDGET`` is at or
past every plateau and recommends the smallest budget that is (rounded up to whole rounds); change the
constant in bench/common.py to that value if it is not.

Writes ``<out>/convergence/``: ``curves.csv``, ``plateaus.csv``, ``summary.json``, ``tables.md`` and
``convergence.png``. Runs (one ``result.json`` each, resumable) are under ``<out>/runs/convergence-*``.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    CLASSIC,
    CONVERGED_BUDGET,
    CONVERGED_IMAGE_SIZE,
    DATASETS,
    NO_CLASSIC,
    QUICK,
    Budget,
    Job,
    Size,
    StudyOutput,
    check_plan,
    finish_study,
    fmt,
    get_dataset,
    markdown_table,
    run_grid,
    setup_runtime,
    study_meta,
    write_csv,
)
from bench.stats import Estimate
from bench.tune import inner_dataset

# baselines off: the curve of the federated model only (local-only models would double the cost)
JOBS = {
    "fedavg-seg-only": Job(
        "fedavg-seg-only",
        "fed",
        ("mlo.mode=seg-only", "federation.strategy=fedavg", NO_CLASSIC),
        ("fedavg-seg-only",),
    ),
    "fedavg-seg-only-classic": Job(
        "fedavg-seg-only-classic",
        "fed",
        ("mlo.mode=seg-only", "federation.strategy=fedavg", CLASSIC),
        ("fedavg-seg-only-classic",),
    ),
}
DATASETS_DEFAULT = ("skin-loso-dermis", "skin-loso-ph2", "skin-loso-dermquest")
QUICK_BUDGET = Budget(rounds=2, local_iterations=10)  # x factor 2: 4 rounds, a pipeline check only
DELTA = 0.01


def curve_size(base: Size, image_size: int, budget: Budget, factor: int, seeds: Sequence[int]) -> Size:
    """The size of the convergence runs: ``factor`` x ``budget.rounds`` rounds of its local iterations."""
    rounds = Budget(budget.rounds * factor, budget.local_iterations)
    what = (
        "QUICK convergence smoke run: checks the pipeline, not evidence"
        if base.name == "quick"
        else f"Convergence curves for the {base.name} size"
    )
    return Size(
        base.name,
        (f"data.image_size={image_size}", *rounds.overrides()),
        seeds=tuple(seeds),
        ns=base.ns,
        note=f"{what} ({image_size} px, {rounds.rounds} rounds x {rounds.local_iterations} local iterations "
        f"= {factor} x the budget {budget.rounds} x {budget.local_iterations}, seeds {list(seeds)}).",
    )


def plateau(iterations: Sequence[int], dice: Sequence[float], delta: float = DELTA) -> int | None:
    """The smallest budget after which the curve never rises more than ``delta`` above its value there."""
    points = [(i, d) for i, d in zip(iterations, dice, strict=True) if math.isfinite(d)]
    for k, (it, d) in enumerate(points):
        if all(later <= d + delta for _, later in points[k + 1 :]):
            return it
    return None


def curves(
    results: Sequence[Mapping[str, Any]], batch_size: int
) -> dict[tuple[str, str, int], dict[str, Any]]:
    """``{(dataset, method, N): {"iterations", "epochs", "mean", "std", "seeds"}}``: after each round, the
    mean over training sites of the inner-validation Dice, then mean ± std over seeds."""
    per: dict[tuple[str, str, int], dict[int, dict[int, float]]] = {}
    local_its: dict[tuple[str, str, int], int] = {}
    for r in results:
        key = (r["dataset"], r["job"], r["n"])
        local = int(
            [o for o in r["overrides"] if o.startswith("federation.local_iterations=")][-1].split("=")[1]
        )
        local_its[key] = local
        for rnd in r["rounds"]:
            values = [d for s, d in rnd["dice"].items() if s in r["sites"]["train"] and d is not None]
            if values:
                per.setdefault(key, {}).setdefault(rnd["round"] * local, {})[r["seed"]] = sum(values) / len(
                    values
                )
    out = {}
    for key, by_it in per.items():
        its = sorted(by_it)
        ests = [Estimate.of(by_it[i].values()) for i in its]
        out[key] = {
            "iterations": its,
            "epochs": [i * batch_size / key[2] for i in its],
            "mean": [e.mean for e in ests],
            "std": [e.std for e in ests],
            "seeds": sorted({s for i in its for s in by_it[i]}),
            "local_iterations": local_its[key],
        }
    return out


def summarise(
    results: Sequence[Mapping[str, Any]],
    out: Path,
    *,
    budget: Budget,
    batch_size: int,
    delta: float = DELTA,
    size_label: str = "",
) -> dict[str, Any]:
    data = curves(results, batch_size)
    curve_rows, plateau_rows, tables = [], [], []
    for (dataset, method, n), c in sorted(data.items()):
        for it, ep, m, sd in zip(c["iterations"], c["epochs"], c["mean"], c["std"], strict=True):
            curve_rows.append(
                {
                    "dataset": dataset,
                    "method": method,
                    "n": n,
                    "iterations": it,
                    "epochs": ep,
                    "mean": m,
                    "std": sd,
                }
            )
        at = plateau(c["iterations"], c["mean"], delta)
        at_budget = next(
            (m for i, m in zip(c["iterations"], c["mean"], strict=True) if i == budget.iterations), None
        )
        plateau_rows.append(
            {
                "dataset": dataset,
                "method": method,
                "n": n,
                "seeds": len(c["seeds"]),
                "plateau_iterations": at,
                "plateau_epochs": None if at is None else at * batch_size / n,
                "dice_at_plateau": None if at is None else c["mean"][c["iterations"].index(at)],
                "dice_at_budget": at_budget,
                "best_dice": max(c["mean"]),
                "budget_iterations": budget.iterations,
                "budget_is_past_plateau": None if at is None else budget.iterations >= at,
            }
        )
    plateaus = [r["plateau_iterations"] for r in plateau_rows if r["plateau_iterations"] is not None]
    local = budget.local_iterations
    needed = max(plateaus) if plateaus else None
    recommended = None if needed is None else Budget(math.ceil(needed / local), local)
    verdict = (
        "no curve yet"
        if needed is None
        else (
            f"The budget {budget.rounds} x {budget.local_iterations} = {budget.iterations} local iterations "
            + (
                "is at or past every plateau"
                if budget.iterations >= needed
                else f"is SHORT of the latest plateau ({needed} iterations)"
            )
            + f"; the smallest budget past every plateau is {recommended.rounds} x {recommended.local_iterations}"
            f" = {recommended.iterations} local iterations per site"
        )
    )
    tables.append(
        f"### Plateaus (Dice on the inner validation split, mean over seeds; plateau = smallest budget after "
        f"which the curve never rises more than {delta} again)\n\n"
        + markdown_table(
            [
                "dataset",
                "method",
                "N",
                "seeds",
                "plateau: local iterations",
                "plateau: epochs",
                "Dice at plateau",
                f"Dice at the budget ({budget.iterations})",
                "best Dice",
                "budget past plateau",
            ],
            [
                [
                    r["dataset"],
                    r["method"],
                    r["n"],
                    r["seeds"],
                    r["plateau_iterations"],
                    fmt(r["plateau_epochs"], 0),
                    fmt(r["dice_at_plateau"]),
                    fmt(r["dice_at_budget"]),
                    fmt(r["best_dice"]),
                    {True: "yes", False: "NO", None: "–"}[r["budget_is_past_plateau"]],
                ]
                for r in plateau_rows
            ],
        )
        + f"\n\n**{verdict}.**"
    )
    for dataset in sorted({d for d, _, _ in data}):
        keys = [k for k in sorted(data) if k[0] == dataset]
        its = sorted({i for k in keys for i in data[k]["iterations"]})
        step = max(1, len(its) // 15)  # about 15 rows
        shown = sorted(set(its[step - 1 :: step]) | {its[-1]} | ({budget.iterations} & set(its)))
        body = []
        for it in shown:
            row: list[Any] = [it]
            for k in keys:
                c = data[k]
                if it in c["iterations"]:
                    j = c["iterations"].index(it)
                    row.append(f"{fmt(c['mean'][j])} ± {fmt(c['std'][j])} ({fmt(c['epochs'][j], 0)} ep.)")
                else:
                    row.append("–")
            body.append(row)
        tables.append(
            f"### {dataset}: inner-validation Dice against local iterations per site\n\n"
            "Mean over training sites, mean ± std over seeds; epochs = iterations x batch size / N.\n\n"
            + markdown_table(["local iterations", *[f"{m}, N = {n}" for _, m, n in keys]], body)
        )
    _plot(out / "convergence.png", data, budget, plateau_rows, size_label)
    write_csv(curve_rows, out / "curves.csv")
    write_csv(plateau_rows, out / "plateaus.csv")
    (out / "tables.md").write_text("\n\n".join(tables) + "\n")
    return {
        "budget": {"rounds": budget.rounds, "local_iterations": local, "iterations": budget.iterations},
        "batch_size": batch_size,
        "delta": delta,
        "plateaus": plateau_rows,
        "recommended": None
        if recommended is None
        else {"rounds": recommended.rounds, "local_iterations": local, "iterations": recommended.iterations},
        "verdict": verdict,
    }


def _plot(
    path: Path,
    data: Mapping[tuple[str, str, int], Mapping[str, Any]],
    budget: Budget,
    plateaus: Sequence[Mapping[str, Any]],
    size_label: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    datasets = sorted({d for d, _, _ in data})
    if not datasets:
        return
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 4), sharey=True, squeeze=False)
    marks = {(r["dataset"], r["method"], r["n"]): r["plateau_iterations"] for r in plateaus}
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for key in [k for k in sorted(data) if k[0] == dataset]:
            c = data[key]
            x, m = np.asarray(c["iterations"]), np.asarray(c["mean"])
            sd = np.nan_to_num(np.asarray(c["std"], dtype=float))
            (line,) = ax.plot(x, m, label=f"{key[1]}, N = {key[2]}")
            ax.fill_between(x, m - sd, m + sd, color=line.get_color(), alpha=0.15)
            at = marks.get(key)
            if at is not None:
                ax.plot([at], [m[list(x).index(at)]], "o", color=line.get_color())
        ax.axvline(budget.iterations, ls="--", color="grey", lw=0.9, label=f"budget ({budget.iterations})")
        ax.set_xlabel("local iterations per site (rounds x local iterations)")
        ax.set_title(dataset)
    axes[0][0].set_ylabel("inner-validation Dice (mean ± std over seeds)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(
        "FedAvg seg-only convergence (dots: plateau)" + (f" ({size_label})" if size_label else ""),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 32 px, 4 rounds x 10 iterations, 1 seed")
    ap.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=None)
    ap.add_argument("--methods", nargs="+", choices=sorted(JOBS), default=list(JOBS))
    ap.add_argument("--ns", nargs="+", type=int, default=None, help="labelled images per site (default 9 50)")
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2 (quick: 0)")
    ap.add_argument("--factor", type=int, default=None, help="curve length in budgets (default 3; quick 2)")
    ap.add_argument("--delta", type=float, default=DELTA, help="plateau tolerance in Dice")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/<size>)")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    ap.add_argument("--dry-run", action="store_true", help="print the runs (done / to do) and stop")
    args = ap.parse_args(argv)

    setup_runtime(args.threads)
    from bench.common import CONVERGED, load_experiment

    base, budget = (QUICK, QUICK_BUDGET) if args.quick else (CONVERGED, CONVERGED_BUDGET)
    image_size = 32 if args.quick else CONVERGED_IMAGE_SIZE
    seeds = args.seeds or ((0,) if args.quick else (0, 1, 2))
    factor = args.factor or (2 if args.quick else 3)
    size = curve_size(base, image_size, budget, factor, seeds)
    root = args.out or Path("bench/results") / size.name
    names = args.datasets or (("skin-loso-dermis",) if args.quick else DATASETS_DEFAULT)
    ns = args.ns or ((9,) if args.quick else (9, 50))
    jobs = [JOBS[m] for m in JOBS if m in args.methods]
    extra = [f"device={args.device}", *args.extra]
    started = time.perf_counter()
    meta = study_meta(size, args.threads) | {"budget": budget.__dict__, "factor": factor}
    # the inner split of each dataset (its test records removed) is what the curves are measured on
    datasets = [inner_dataset(get_dataset(d), size, root, study="convergence") for d in names]
    check_plan(datasets, size, jobs, extra)
    results = run_grid(
        root, datasets, size, jobs, ns, seeds, extra=extra, progress=args.progress, dry_run=args.dry_run
    )
    if args.dry_run:
        return
    batch = load_experiment(datasets[0], [*size.overrides, *extra]).mlo.batch_size
    out = StudyOutput(root, "convergence").folder
    summary = summarise(results, out, budget=budget, batch_size=batch, delta=args.delta, size_label=size.name)
    finish_study(out, meta, started, results, summary)


if __name__ == "__main__":
    main()
