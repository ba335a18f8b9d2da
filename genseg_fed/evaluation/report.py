"""``report.md`` and its plots for a federated run, from the run's ``metrics.json`` content."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .plots import plot_curves, plot_heatmap

__all__ = ["format_table", "write_report"]


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _dice_per_round(history: Mapping[str, Any]) -> dict[str, list[tuple[float, float]]]:
    curves: dict[str, list[tuple[float, float]]] = {}
    for rec in history["rounds"]:
        for site, models in rec["evaluate"].items():
            dice = models.get("global", {}).get("dice")
            if dice is not None:
                curves.setdefault(site, []).append((rec["round"], dice))
    roles = {name: site.get("role") for name, site in history.get("sites", {}).items()}
    # training sites first, then held-out ones, each by name (not in the order nodes happened to answer)
    return {s: curves[s] for s in sorted(curves, key=lambda s: (roles.get(s) != "train", s))}


_MECHANISMS = ("disc", "gen", "hyper", "seg")


def _privacy_section(history: Mapping[str, Any], out: Path) -> list[str]:
    """Per site and round: epsilon spent, noise multipliers and clipping norms; the epsilon plot."""
    privacy = history.get("privacy") or {}
    sites, central = privacy.get("sites") or {}, privacy.get("central") or {}
    if not privacy.get("sample_level") and not central:
        return []
    lines = ["", "## Privacy", ""]
    if privacy.get("sample_level"):
        lines += [
            "Sample-level DP at every site: every update that reads a patient's record (discriminator, "
            "generator, segmenter, level-III hypergradient) is clipped and noised, and one accountant per site "
            "composes them all (see docs/privacy.md). Epsilon is per site, at the site's delta, over everything "
            "it sent so far; the scalar test metrics and counts are not covered.",
            "",
        ]
        rows = []
        for name, site in sites.items():
            for r in site["rounds"]:
                rows.append(
                    [
                        r["round"],
                        name,
                        r.get("status", "trained"),
                        r.get("epsilon"),
                        r.get("epsilon-target"),
                        f"{r['delta']:.0e}" if r.get("delta") else None,
                        r.get("sample-rate"),
                        *[_noise_clip(r, m) for m in _MECHANISMS],
                    ]
                )
        rows.sort(key=lambda row: (row[0], row[1]))
        header = ["round", "site", "status", "epsilon", "target", "delta", "q"]
        header += [f"{m}: sigma / C" for m in _MECHANISMS]
        lines.append(format_table(header, rows))
        lines += [
            "",
            "sigma: noise multiplier (noise std / L2 sensitivity); C: clipping norm. The sensitivity is C for the "
            "per-record clipped updates (disc, gen, seg; Poisson rate q) and 2C for the whole level-III update "
            "(hyper; no sampling).",
        ]
        curves = {
            name: [(r["round"], r["epsilon"]) for r in site["rounds"] if r.get("epsilon") is not None]
            for name, site in sites.items()
        }
        rounds = [r["round"] for site in sites.values() for r in site["rounds"]]
        targets = {n: s.get("epsilon_target") for n, s in sites.items()}
        targets = {n: t for n, t in targets.items() if t is not None and math.isfinite(t)}
        if rounds and targets:
            span = (min(rounds), max(rounds))
            if len(set(targets.values())) == 1:  # one line for a shared budget
                targets = {"all sites": next(iter(targets.values()))}
            for name, target in targets.items():
                curves[f"target ({name})"] = [(span[0], target), (span[1], target)]
        if any(curves.values()):
            plot_curves(
                out / "epsilon_per_round.png",
                curves,
                xlabel="round",
                ylabel="epsilon (spent)",
                title="Privacy spent per site",
            )
            lines += ["", "![Epsilon per round](epsilon_per_round.png)"]
    if central:
        lines += [
            "",
            f"Client-level DP at the coordinator (`{privacy.get('central_mode')}` clipping): each site's round "
            f"update clipped to {_fmt(central.get('clip'))}, Gaussian noise with multiplier "
            f"{_fmt(central.get('noise_multiplier'))} on the mean; epsilon {_fmt(central.get('epsilon'))} at "
            f"delta {central.get('delta')} after {central.get('releases')} releases (one hospital's whole "
            "participation is the protected unit).",
        ]
    return lines


def _noise_clip(r: Mapping[str, Any], mechanism: str) -> str | None:
    sigma, clip = r.get(f"noise-{mechanism}"), r.get(f"clip-{mechanism}")
    return None if sigma is None else f"{sigma:.3g} / {clip:.3g}"


def write_report(history: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> Path:
    """Write ``report.md`` (+ ``dice_per_round.png``, ``crosssite_dice.png``) into ``out_dir``."""
    out = Path(out_dir)
    run, cfg, sites = history["run"], history["run"]["config"], history["sites"]
    fed, mlo, data = cfg["federation"], cfg["mlo"], cfg["data"]
    lines = [f"# genseg-fed run `{run['name']}`", ""]

    seconds = run.get("seconds")
    lines += [
        "## What ran",
        "",
        f"- **Method**: `{mlo['mode']}` with a `{cfg['model']['segmenter']}` segmenter; "
        f"strategy `{fed['strategy']}`"
        + (f" (robust: `{fed['robust']}`)" if fed["robust"] != "none" else ""),
        f"- **Rounds**: {len(history['rounds'])} × {fed['local_iterations']} local iterations; shared: "
        f"{', '.join(fed['share'])}"
        + ("; normalisation layers kept local (FedBN)" if fed["local_norm"] else ""),
        f"- **Data**: {data['image_size']}×{data['image_size']} px, {data['channels']} channel(s), "
        f"n_train={data['n_train']}, n_val={data['n_val']} per site",
        f"- **Run key** `{run['run_key']}`"
        + (f", {seconds / 60:.1f} min" if seconds else "")
        + (f"; resumed after round(s) {run['resumed_at_round']}" if run.get("resumed_at_round") else ""),
    ]
    if any(s.get("simulated_shift") for s in sites.values()):
        lines += [
            "",
            "> **The domain shift between these sites is simulated**: they are slices of one real MRI template "
            "(MNI152) with simulated acquisition profiles and deformations, not images from different hospitals.",
        ]
    lines += ["", "## Sites", ""]
    lines.append(
        format_table(
            ["site", "role", "train", "val", "test", "data"],
            [
                [name, s["role"], s["n_train"], s["n_val"], s["n_test"], s["description"][:90]]
                for name, s in sites.items()
            ],
        )
    )

    curves = _dice_per_round(history)
    if curves:
        names = list(curves)
        rows = []
        for rec in history["rounds"]:
            ev = rec["evaluate"]
            rows.append([rec["round"], *[ev.get(n, {}).get("global", {}).get("dice") for n in names]])
        lines += ["", "## Test Dice of the global model per round", "", format_table(["round", *names], rows)]
        plot_curves(
            out / "dice_per_round.png", curves, xlabel="round", ylabel="test Dice", title="Global model"
        )
        lines += ["", "![Dice per round](dice_per_round.png)"]

    failures = [(rec["round"], f) for rec in history["rounds"] for f in rec["failures"]]
    cross = history.get("crosssite")
    if cross:
        failures += [("cross-site", f) for f in cross.get("failures", [])]
    if failures:
        lines += ["", "## Failures", "", "Rounds continue with the sites that answered; these did not:", ""]
        lines.append(
            format_table(
                ["round", "site", "stage", "reason"],
                [[r, f["site"], f["stage"], f["reason"]] for r, f in failures],
            )
        )

    if cross:
        heldout = set(cross["heldout"])
        cols = [f"{s} (held-out)" if s in heldout else s for s in cross["sites"]]
        dice = np.array([[np.nan if v is None else v for v in row] for row in cross["dice"]], dtype=float)
        train_cols = [j for j, s in enumerate(cross["sites"]) if s not in heldout]
        held_cols = [j for j, s in enumerate(cross["sites"]) if s in heldout]
        rows = []
        for i, model in enumerate(cross["models"]):
            row = [model, *dice[i].tolist()]
            row.append(
                float(np.nanmean(dice[i, train_cols]))
                if train_cols and np.isfinite(dice[i, train_cols]).any()
                else None
            )
            row.append(
                float(np.nanmean(dice[i, held_cols]))
                if held_cols and np.isfinite(dice[i, held_cols]).any()
                else None
            )
            rows.append(row)
        lines += [
            "",
            "## Cross-site generalisation (test Dice, models × sites)",
            "",
            "Rows are models: `global` (the federated model), `local:<site>` (trained only at that site with the "
            "same number of iterations, from the same initial weights), `finetuned:<site>` (the global model "
            "fine-tuned at that site). Columns are each site's test images; held-out sites never trained.",
            "",
            format_table(["model", *cols, "mean (training sites)", "mean (held-out)"], rows),
        ]
        plot_heatmap(
            out / "crosssite_dice.png", dice, row_labels=cross["models"], col_labels=cols, title="Test Dice"
        )
        lines += ["", "![Cross-site Dice](crosssite_dice.png)"]

    lines += _privacy_section(history, out)

    samples = history.get("samples") or {}
    if samples:
        lines += [
            "",
            "## Synthetic samples (written on site)",
            "",
            "Each site writes mask | synthetic image | real image | prediction to its own state folder; the "
            "images never cross the wire. In this simulation the sites share this machine:",
            "",
        ]
        for site, path in samples.items():
            rel = os.path.relpath(path, out)
            lines += [f"### {site}", "", f"![{site} samples]({rel})", ""]
    lines += ["", "Numbers in this report come from `metrics.json` in the same folder."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
