"""Tuning sweep of GenSeg's level-III defaults on a validation protocol that never sees a test split.

    python bench/tune.py --quick --threads 1     # skin (DermIS held out), N=9, 2 seeds, 6 genseg settings
    python bench/tune.py --device auto           # full: more settings, 3 seeds, the configs' budget

**Protocol (inner split of the training sites).** For each training site of the dataset, the records of its
*test* split are removed and the rest (what the site may use for training and validation) is written to
``<out>/tune/data/<site>/``. The tuning federation runs on those folders only: its own deterministic split
(``data.split_seed=1``, ``test_fraction=0.3``) carves an inner validation set out of them, on which the
global model is scored. The held-out site is not used at all. No record of any test split used by the other
studies is trained on or scored here, so the chosen defaults do not leak test information.

Swept one at a time from the current defaults (``mlo.hyper_params=arch``, ``hyper_lr=3e-3``,
``hyper_every=1``, ``synthetic_per_real=1``), with FedAvg seg-only and aug on the same protocol for scale.
Writes ``<out>/tune/``: ``sweep.csv``, ``summary.json``, ``tables.md``, ``sweep.png``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    DATASETS,
    FULL,
    QUICK,
    Dataset,
    Job,
    Size,
    ci,
    get_dataset,
    load_experiment,
    markdown_table,
    pm,
    run_job,
    setup_runtime,
    study_meta,
    write_csv,
    write_json,
)
from bench.stats import Estimate, paired_difference

N = 9
DEFAULT = ("mlo.hyper_params=arch", "mlo.hyper_lr=0.003", "mlo.hyper_every=1", "mlo.synthetic_per_real=1")
QUICK_SWEEP = {
    "genseg (defaults)": (),
    "hyper_params=decoder": ("mlo.hyper_params=decoder",),
    "hyper_lr=1e-3": ("mlo.hyper_lr=0.001",),
    "hyper_lr=1e-2": ("mlo.hyper_lr=0.01",),
    "hyper_every=5": ("mlo.hyper_every=5",),
    "synthetic_per_real=2": ("mlo.synthetic_per_real=2",),
}
FULL_SWEEP = {
    **QUICK_SWEEP,
    "hyper_params=all": ("mlo.hyper_params=all",),
    "hyper_lr=3e-2": ("mlo.hyper_lr=0.03",),
    "hyper_every=2": ("mlo.hyper_every=2",),
    "hyper_every=10": ("mlo.hyper_every=10",),
    "synthetic_per_real=0": ("mlo.synthetic_per_real=0",),
    "synthetic_per_real=4": ("mlo.synthetic_per_real=4",),
}
REFERENCES = {"seg-only (FedAvg)": ("mlo.mode=seg-only",), "aug (FedAvg)": ("mlo.mode=aug",)}
BASELINE = "genseg (defaults)"


def _slug(label: str) -> str:
    return "tune-" + "".join(c if c.isalnum() or c in "-=." else "_" for c in label)


def inner_dataset(dataset: Dataset, size: Size, root: Path, *, study: str = "tune") -> Dataset:
    """The training sites without their test records, as folder sites, and an experiment YAML using them
    (under ``root/<study>/<dataset>/``; the dataset is named ``<study>-<dataset>``)."""
    import yaml

    from genseg_fed.config import config_to_dict
    from genseg_fed.data import write_site_folder
    from genseg_fed.local import load_split

    folder = root / study / dataset.name
    path = folder / "experiment.yaml"
    name = f"{study}-{dataset.name}"
    if path.is_file():
        return Dataset(name, str(path), f"inner split of {dataset.name}", dataset.simulated_shift)
    cfg = load_experiment(dataset, [*dataset.overrides, *size.overrides, "data.n_train=null"])
    sites = []
    for spec in cfg.data.sites:
        split = load_split(cfg, spec)
        keep = sorted(set(split.train.ids) | set(split.val.ids))
        data = split.train.__class__.concat([split.train, split.val], spec.name)
        data = type(data)(
            name=spec.name,
            images=data.images,
            masks=data.masks,
            ids=tuple(i.split("/", 1)[1] for i in data.ids),
            groups=tuple(g.split("/", 1)[1] for g in data.groups),
            simulated_shift=data.simulated_shift,
            description=f"{spec.name} without its test split ({len(keep)} records)",
        )
        target = folder / "data" / spec.name
        if not target.is_dir():
            write_site_folder(data, target)
        sites.append({"name": spec.name, "source": "folder", "path": str(target.resolve())})
    raw = config_to_dict(cfg)
    raw["name"] = name
    raw["data"].update({"sites": sites, "heldout": [], "split_seed": 1, "test_fraction": 0.3, "n_train": N})
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return Dataset(name, str(path), f"inner split of {dataset.name}", dataset.simulated_shift)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="skin-loso-dermis")
    ap.add_argument("--seeds", nargs="+", type=int, default=None)
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)

    setup_runtime(args.threads)
    from tqdm.auto import tqdm

    size = QUICK if args.quick else FULL
    root = args.out or Path("bench/results") / size.name
    seeds = args.seeds or ((0, 1) if args.quick else (0, 1, 2))
    # the size's geometry and budget, but the inner split's own data settings
    size = Size(size.name, size.overrides, seeds=tuple(seeds), ns=(N,))
    dataset = inner_dataset(get_dataset(args.dataset), size, root)
    sweep = {**(QUICK_SWEEP if args.quick else FULL_SWEEP), **REFERENCES}
    jobs = {
        label: Job(
            _slug(label),
            "fed",
            ("mlo.mode=genseg", *DEFAULT, *ov) if "mlo.mode" not in " ".join(ov) else ov,
            (label,),
        )
        for label, ov in sweep.items()
    }
    started = time.perf_counter()
    results: dict[str, dict[int, dict[str, Any]]] = {}
    plan = [(label, seed) for seed in seeds for label in jobs]
    for label, seed in tqdm(plan, desc="tuning runs", dynamic_ncols=True, disable=not args.progress):
        r = run_job(
            root,
            dataset,
            size,
            jobs[label],
            N,
            seed,
            extra=[f"device={args.device}", *args.extra],
            progress=args.progress,
        )
        if r is not None:
            results.setdefault(label, {})[seed] = r
    out = root / "tune"
    scores = {
        label: {s: sum(r["methods"][label].values()) / len(r["methods"][label]) for s, r in by_seed.items()}
        for label, by_seed in results.items()
    }
    rows, body = [], []
    for label in sweep:
        if label not in scores:
            continue
        est = Estimate.of(scores[label].values())
        diff = paired_difference(scores[label], scores.get(BASELINE, {}))
        rows.append(
            {
                "setting": label,
                "overrides": " ".join(jobs[label].overrides),
                "seeds": est.n,
                "val_dice_mean": est.mean,
                "val_dice_std": est.std,
                "diff_vs_defaults": diff.mean,
                "ci95_lo": diff.lo,
                "ci95_hi": diff.hi,
            }
        )
        body.append([label, pm(est), "(baseline)" if label == BASELINE else ci(diff)])
    write_csv(rows, out / "sweep.csv")
    text = (
        f"### Level-III sweep on the inner validation split of {args.dataset}'s training sites (FedAvg, N = {N}, seeds {list(seeds)})\n\n"
        "Inner-validation Dice of the global model, mean over training sites (mean ± std over seeds); "
        "Δ = per-seed paired difference to the current defaults, 95% t CI.\n\n"
        + markdown_table(["setting", "inner-validation Dice", "Δ vs defaults [95% CI]"], body)
    )
    (out / "tables.md").write_text(text + "\n")
    _plot(out / "sweep.png", rows)
    meta = {**study_meta(size, args.threads), "seconds": time.perf_counter() - started}
    write_json({"meta": meta, "sweep": rows}, out / "summary.json")
    print(text)
    print(f"wrote {out} in {meta['seconds'] / 60:.1f} min")


def _plot(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 0.4 * len(rows) + 1.2))
    y = list(range(len(rows)))
    ax.errorbar(
        [r["val_dice_mean"] for r in rows],
        y,
        xerr=[0 if r["val_dice_std"] != r["val_dice_std"] else r["val_dice_std"] for r in rows],
        fmt="o",
        capsize=3,
    )
    ax.set_yticks(y, [r["setting"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("inner-validation Dice (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
