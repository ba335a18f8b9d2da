"""Cost study: time per local iteration per mode, peak memory, bytes per client per round, round time,
and how round time grows with the number of simulated hospitals.

    python bench/cost.py --quick --threads 1      # 32 px; scaling with 3, 10, 30 MNI152 hospitals
    python bench/cost.py --device auto            # 64 px (the configs' size), longer timings

Parts (each writes its own file under ``<out>/cost/`` and is skipped when that file exists, so a killed
study continues; ``--redo`` measures again):

1. **step**: seconds per local iteration of ``seg-only``, ``aug`` and ``genseg`` on the same site, interleaved
   in one process so machine load hits the modes alike (``bench/step_cost.py``, run as a subprocess),
   with the ratio to ``seg-only``.
2. **memory**: peak resident memory (CPU: ``ru_maxrss`` of a fresh process per mode, minus the same process
   before its first iteration; CUDA: ``torch.cuda.max_memory_allocated``) over a few iterations.
3. **rounds**: a short federation per mode through the in-process transport: array bytes each client
   sends and receives per round (``ArrayRecord.count_bytes``: float32 data + keys), and wall time per round
   split into site training, site evaluation and the coordinator's own work.
4. **scaling**: ``seg-only`` federations of 3, 10 and 30 hospitals (MNI152 slices; the simulated acquisition
   profiles and orientations repeat) for 2 rounds: round time as measured (sites run one after another in
   this transport) and the parallel estimate a real deployment would see (slowest site + coordinator).
5. **loading**: seconds to load each site's data (skin, MNI152, MSD hippocampus sites), which the ClientApp
   does for every message it handles.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    command_line,
    fmt,
    machine_info,
    markdown_table,
    run_federated,
    setup_runtime,
    write_json,
)

MODES = ("seg-only", "aug", "genseg")
SKIN = REPO / "configs/skin3-loso-dermis.yaml"
DEFAULT = REPO / "configs/default.yaml"
PROFILES = ("scanner-a", "scanner-b", "scanner-c")
ORIENTATIONS = ("axial", "coronal", "sagittal")

QUICK = {
    "size": ["data.image_size=32"],
    "step_iterations": 12,
    "memory_iterations": 5,
    "round_iterations": 5,
    "scaling_sites": (3, 10, 30),
    "scaling_iterations": 5,
}
FULL = {
    "size": [],
    "step_iterations": 30,
    "memory_iterations": 10,
    "round_iterations": 30,
    "scaling_sites": (3, 10, 30),
    "scaling_iterations": 30,
}


# ----------------------------------------------------------------------------------------- 1. step


def measure_steps(out: Path, size: dict[str, Any], *, threads: int, device: str) -> dict[str, Any]:
    path = out / "step.json"
    cmd = [
        sys.executable,
        str(REPO / "bench/step_cost.py"),
        "--config",
        str(SKIN),
        "--iterations",
        str(size["step_iterations"]),
        "--warmup",
        "3",
        "--blocks",
        "3",
        "--threads",
        str(threads),
        "--json",
        str(path),
        "--set",
        f"device={device}",
    ]
    for item in size["size"]:
        cmd += ["--set", item]
    subprocess.run(cmd, check=True, cwd=REPO)
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------- 2. memory


def _memory_child(mode: str, overrides: list[str], iterations: int, threads: int) -> None:
    """In a fresh process: build one site's trainer, run ``iterations`` steps, print peak memory as JSON."""
    import torch

    from genseg_fed.config import load_config
    from genseg_fed.data import Augmenter
    from genseg_fed.local import load_split
    from genseg_fed.mlo.trainer import GenSegTrainer, build_networks
    from genseg_fed.runtime import resolve_device

    torch.set_num_threads(threads)
    cfg = load_config(SKIN, [*overrides, f"mlo.mode={mode}"])
    split = load_split(cfg, cfg.data.sites[0])
    device = resolve_device(cfg.device)
    nets = build_networks(cfg.model, channels=cfg.data.channels, image_size=cfg.data.image_size, mode=mode)
    trainer = GenSegTrainer(
        cfg.mlo, nets, split.train, split.val, Augmenter(cfg.augment, seed=0), device=device
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.train(iterations)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = {k: sum(p.numel() for p in v.parameters()) for k, v in nets.parts().items()}
    result = {
        "mode": mode,
        "device": str(device),
        "peak_rss_mib": after,
        "rss_before_training_mib": before,
        "training_peak_increase_mib": after - before,
        "cuda_peak_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20
        if device.type == "cuda"
        else None,
        "parameters": params,
    }
    print(json.dumps(result))


def measure_memory(out: Path, size: dict[str, Any], *, threads: int, device: str) -> list[dict[str, Any]]:
    rows = []
    for mode in MODES:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--memory-child",
            mode,
            "--threads",
            str(threads),
            "--iterations",
            str(size["memory_iterations"]),
            *[x for item in [*size["size"], f"device={device}"] for x in ("--set", item)],
        ]
        text = subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True).stdout
        rows.append(json.loads(text.strip().splitlines()[-1]))
    write_json(rows, out / "memory.json")
    return rows


# ----------------------------------------------------------------------------------------- 3. rounds


def round_breakdown(fed: dict[str, Any], sites: Sequence[str]) -> list[dict[str, Any]]:
    """Per round: wall seconds, summed site train / evaluate seconds, the slowest site, coordinator time.

    Messages are attributed to rounds in order: each round is one train message per training site followed
    by one evaluate message per site (the transport handles them synchronously, in that order).
    """
    rounds = fed["history"]["rounds"]
    traffic = [t for t in fed["traffic"] if t["type"] in ("train", "evaluate")]
    n_train = len(fed["history"]["run"]["config"]["data"]["sites"])
    per_round = n_train + len(sites)
    out = []
    for i, rec in enumerate(rounds):
        msgs = traffic[i * per_round : (i + 1) * per_round]
        train = [t for t in msgs if t["type"] == "train"]
        evaluate = [t for t in msgs if t["type"] == "evaluate"]
        site_total = sum(t["seconds"] for t in msgs)
        out.append(
            {
                "round": rec["round"],
                "wall_seconds": rec["seconds"],
                "site_train_seconds_sum": sum(t["seconds"] for t in train),
                "site_train_seconds_max": max((t["seconds"] for t in train), default=0.0),
                "site_evaluate_seconds_sum": sum(t["seconds"] for t in evaluate),
                "site_evaluate_seconds_max": max((t["seconds"] for t in evaluate), default=0.0),
                "coordinator_seconds": rec["seconds"] - site_total,
                "bytes_up_per_client": float(sum(t["bytes_up"] for t in train) / max(1, len(train))),
                "bytes_down_per_client": float(sum(t["bytes_down"] for t in train) / max(1, len(train))),
                "evaluate_bytes_down_per_site": float(
                    sum(t["bytes_down"] for t in evaluate) / max(1, len(evaluate))
                ),
            }
        )
    return out


def _mean(rows: Sequence[dict[str, Any]], key: str) -> float:
    return float(sum(r[key] for r in rows) / max(1, len(rows)))


def measure_rounds(out: Path, size: dict[str, Any], *, device: str, progress: bool) -> list[dict[str, Any]]:
    rows = []
    for mode in MODES:
        run = out / "runs" / f"rounds-{mode}"
        shutil.rmtree(run, ignore_errors=True)  # timings of a resumed run would miss its first rounds
        overrides = [
            *size["size"],
            f"mlo.mode={mode}",
            "federation.rounds=2",
            f"federation.local_iterations={size['round_iterations']}",
            "federation.baselines=false",
            f"device={device}",
        ]
        fed = run_federated(SKIN, overrides, run, progress=progress)
        sites = list(fed["history"]["sites"])
        per_round = round_breakdown(fed, sites)
        rows.append(
            {
                "mode": mode,
                "dataset": "skin-loso-dermis (2 training sites + 1 held-out)",
                "local_iterations": size["round_iterations"],
                "rounds": per_round,
                **{k: _mean(per_round, k) for k in per_round[0] if k != "round"},
            }
        )
    write_json(rows, out / "rounds.json")
    return rows


# ----------------------------------------------------------------------------------------- 5. data loading

LOAD_CONFIGS = {
    "skin (npz, 128 px images)": REPO / "configs/skin3.yaml",
    "mni152 (template slices)": DEFAULT,
    "hippo (npz volumes, simulated profiles)": REPO / "bench/configs/hippo-sites.yaml",
}


def measure_loading(out: Path, size: dict[str, Any], *, repeats: int = 2) -> list[dict[str, Any]]:
    """Seconds to load each site as the ClientApp does for every message it handles (``load_site``)."""
    from genseg_fed.config import load_config
    from genseg_fed.data import load_site

    rows = []
    for label, path in LOAD_CONFIGS.items():
        cfg = load_config(path, size["size"])
        for spec in [*cfg.data.sites, *cfg.data.heldout]:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                data = load_site(
                    spec,
                    image_size=cfg.data.image_size,
                    channels=cfg.data.channels,
                    empty_masks=cfg.data.empty_masks,
                )
                times.append(time.perf_counter() - t0)
            rows.append(
                {
                    "dataset": label,
                    "site": spec.name,
                    "images": len(data),
                    "seconds_min": min(times),
                    "seconds_max": max(times),
                }
            )
    write_json(rows, out / "loading.json")
    return rows


# ----------------------------------------------------------------------------------------- 4. scaling


def hospitals_config(path: Path, k: int) -> Path:
    """An experiment YAML with ``k`` MNI152 hospitals (profiles and orientations repeat) and no held-out site."""
    import yaml

    sites = [
        {
            "name": f"hospital-{i + 1:03d}",
            "source": "mni152",
            "orientation": ORIENTATIONS[i % 3],
            "profile": PROFILES[(i // 3) % 3],
        }
        for i in range(k)
    ]
    cfg = yaml.safe_load(DEFAULT.read_text())
    cfg["name"] = f"scaling-{k}"
    cfg["data"]["sites"] = sites
    cfg["data"]["heldout"] = []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def measure_scaling(out: Path, size: dict[str, Any], *, device: str, progress: bool) -> list[dict[str, Any]]:
    rows = []
    for k in size["scaling_sites"]:
        part = out / f"scaling-{k}.json"
        if part.is_file():
            rows.append(json.loads(part.read_text()))
            continue
        config = hospitals_config(out / "runs" / f"sites-{k}.yaml", k)
        overrides = [
            *size["size"],
            "mlo.mode=seg-only",
            "federation.rounds=2",
            f"federation.local_iterations={size['scaling_iterations']}",
            "federation.baselines=false",
            f"device={device}",
        ]
        run = out / "runs" / f"scaling-{k}"
        shutil.rmtree(run, ignore_errors=True)
        started = time.perf_counter()
        fed = run_federated(config, overrides, run, progress=progress)
        per_round = round_breakdown(fed, list(fed["history"]["sites"]))
        row = {
            "hospitals": k,
            "mode": "seg-only",
            "local_iterations": size["scaling_iterations"],
            "run_seconds": time.perf_counter() - started,
            "rounds": per_round,
            **{key: _mean(per_round, key) for key in per_round[0] if key != "round"},
        }
        row["parallel_estimate_seconds"] = (
            row["site_train_seconds_max"] + row["site_evaluate_seconds_max"] + row["coordinator_seconds"]
        )
        write_json(row, part)
        rows.append(row)
    write_json(rows, out / "scaling.json")
    return rows


def _plot_scaling(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    ks = [r["hospitals"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(ks, [r["wall_seconds"] for r in rows], "o-", label="round, measured (sites one after another)")
    ax.plot(ks, [r["parallel_estimate_seconds"] for r in rows], "s--", label="round, parallel estimate")
    ax.plot(ks, [r["coordinator_seconds"] for r in rows], "^:", label="coordinator's own work")
    ax.set_xlabel("simulated hospitals (MNI152, seg-only)")
    ax.set_ylabel("seconds per round")
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_steps(step: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = step["results"]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    bottom = [0.0] * len(rows)
    for key, label in (
        ("time_level1", "level I (pix2pix)"),
        ("time_synthetic", "synthetic pairs (pool)"),
        ("time_level2", "level II (segmenter)"),
        ("time_level3", "level III (hypergradient)"),
    ):
        values = [max(0.0, r[key]) for r in rows]
        ax.bar([r["variant"] for r in rows], values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("wall seconds per local iteration (mean)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- report


def tables(
    step: dict[str, Any],
    memory: list[dict[str, Any]],
    rounds: list[dict[str, Any]],
    scaling: list[dict[str, Any]],
    loading: list[dict[str, Any]] | None = None,
) -> str:
    meta = step["meta"]
    mem = {m["mode"]: m for m in memory}
    rnd = {r["mode"]: r for r in rounds}
    body = []
    for r in step["results"]:
        mode = r["variant"]
        m, w = mem.get(mode, {}), rnd.get(mode, {})
        body.append(
            [
                mode,
                fmt(r["cpu_seconds_per_iteration"], 4),
                fmt(r["cpu_ratio"], 2),
                fmt(r["run_cpu_ratio"], 2),
                fmt(m.get("peak_rss_mib"), 0),
                fmt(m.get("training_peak_increase_mib"), 0),
                fmt(w.get("bytes_up_per_client", float("nan")) / 1e6, 2),
                fmt(w.get("bytes_down_per_client", float("nan")) / 1e6, 2),
                fmt(w.get("wall_seconds"), 1),
                fmt(w.get("site_train_seconds_sum"), 1),
                fmt(w.get("site_evaluate_seconds_sum"), 1),
                fmt(w.get("coordinator_seconds"), 2),
            ]
        )
    it = rounds[0]["local_iterations"] if rounds else "?"
    text = [
        f"### Per mode ({meta['site']}, {meta['image_size']} px, batch {meta['batch_size']}, {meta['threads']} thread(s), {meta['device']})",
        "",
        markdown_table(
            [
                "mode",
                "CPU s / local iteration (mean)",
                "× seg-only",
                "× seg-only, whole run with pre-training",
                "peak RSS (MiB)",
                "training peak increase (MiB)",
                "MB sent per client per round",
                "MB received per client per round",
                f"round wall time (s), {it} local it.",
                "site training (s, all sites)",
                "site evaluation (s, all sites)",
                "coordinator (s)",
            ],
            body,
        ),
    ]
    if loading:
        text += [
            "",
            "### Loading a site's data (done by the ClientApp for every message it handles)",
            "",
            markdown_table(
                ["dataset", "site", "images", "seconds (fastest of 2)", "seconds (slowest of 2)"],
                [
                    [r["dataset"], r["site"], r["images"], fmt(r["seconds_min"], 2), fmt(r["seconds_max"], 2)]
                    for r in loading
                ],
            ),
        ]
    if scaling:
        text += [
            "",
            f"### Round time against the number of hospitals (seg-only, {scaling[0]['local_iterations']} local iterations, 2 rounds)",
            "",
            markdown_table(
                [
                    "hospitals",
                    "round wall time, measured (s)",
                    "site training, sum (s)",
                    "site evaluation, sum (s)",
                    "coordinator (s)",
                    "parallel estimate (s)",
                    "per hospital, measured (s)",
                ],
                [
                    [
                        r["hospitals"],
                        fmt(r["wall_seconds"], 1),
                        fmt(r["site_train_seconds_sum"], 1),
                        fmt(r["site_evaluate_seconds_sum"], 1),
                        fmt(r["coordinator_seconds"], 2),
                        fmt(r["parallel_estimate_seconds"], 1),
                        fmt(r["wall_seconds"] / r["hospitals"], 2),
                    ]
                    for r in scaling
                ],
            ),
        ]
    return "\n".join(text) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--parts",
        nargs="+",
        choices=["step", "memory", "rounds", "scaling", "loading"],
        default=["step", "memory", "rounds", "scaling", "loading"],
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--out", type=Path, default=None, help="results folder (default bench/results/<quick|full>)"
    )
    ap.add_argument("--redo", action="store_true", help="measure parts whose files exist again")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    ap.add_argument("--memory-child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--iterations", type=int, default=5, help=argparse.SUPPRESS)
    ap.add_argument("--set", dest="extra", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.memory_child:
        _memory_child(args.memory_child, args.extra, args.iterations, args.threads)
        return
    setup_runtime(args.threads)
    size = QUICK if args.quick else FULL
    out = (args.out or Path("bench/results") / ("quick" if args.quick else "full")) / "cost"
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    previous = out / "summary.json"
    # seconds each part took when it was measured (kept across invocations that reuse its file)
    timings: dict[str, float] = (
        json.loads(previous.read_text())["meta"].get("part_seconds", {}) if previous.is_file() else {}
    )

    def part(name: str, file: str, fn: Any) -> Any:
        path = out / file
        if name not in args.parts:
            return json.loads(path.read_text()) if path.is_file() else None
        if path.is_file() and not args.redo:
            return json.loads(path.read_text())
        t0 = time.perf_counter()
        value = fn()
        timings[name] = time.perf_counter() - t0
        return value

    step = part(
        "step", "step.json", lambda: measure_steps(out, size, threads=args.threads, device=args.device)
    )
    memory = part(
        "memory", "memory.json", lambda: measure_memory(out, size, threads=args.threads, device=args.device)
    )
    rounds = part(
        "rounds", "rounds.json", lambda: measure_rounds(out, size, device=args.device, progress=args.progress)
    )
    if args.redo and "scaling" in args.parts:
        for f in out.glob("scaling-*.json"):
            f.unlink()
    scaling = part(
        "scaling",
        "scaling.json",
        lambda: measure_scaling(out, size, device=args.device, progress=args.progress),
    )
    loading = part("loading", "loading.json", lambda: measure_loading(out, size))
    if step:
        _plot_steps(step, out / "step_cost.png")
    if scaling:
        _plot_scaling(scaling, out / "round_time_vs_hospitals.png")
    text = tables(step, memory or [], rounds or [], scaling or [], loading or []) if step else ""
    (out / "tables.md").write_text(text)
    meta = {
        "command": command_line(),
        "size": "quick" if args.quick else "full",
        "machine": machine_info(args.threads),
        "seconds": time.perf_counter() - started,
        "part_seconds": timings,
        "max_rss_this_process_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "pid": os.getpid(),
    }
    write_json(
        {"meta": meta, "step": step, "memory": memory, "rounds": rounds, "scaling": scaling},
        out / "summary.json",
    )
    print(text)
    print(f"wrote {out} in {meta['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
