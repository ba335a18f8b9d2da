"""The benchmark harness shared by every study: datasets, jobs, a resumable run store, statistics.

A *run* is one ``(dataset, job, N, seed)``: one federated experiment (the real coordinator
``server.federation.run_federation`` and the real ``client.client_app.app``, connected by the in-process
transport :class:`server.inprocess.InProcessGrid`: same messages and code path as ``genseg-fed simulate``,
without the SuperLink and Ray start-up) or one pooled training (``genseg_fed.local.train_pooled``).
Each run writes its own folder ``<results>/runs/<dataset>/<job>/n<N>/seed<S>/`` and, when it is complete,
``result.json`` in it. A study skips runs whose ``result.json`` exists, and a federated run that was killed
mid-way resumes from its coordinator checkpoint, so a killed benchmark continues where it stopped.

A job can yield several *methods*: a FedAvg run with ``federation.baselines`` also trains, at each site,
a local-only model with the same budget (``local:<site>`` rows of the cross-site matrix); those are the
``local-*`` methods.

**Protocol** (the same for every size and method):

* **N counts labelled images per site**: training plus validation (``data.n_train = N - data.n_val``). A
  method without level III trains on the validation images too (the library's fair data-access rule,
  ``genseg_fed.data.splits.training_split``), so every method of a ``(dataset, N, seed)`` reads exactly the
  same N labelled images per site (``labelled`` in each ``result.json``; tested in ``tests/bench``).
* **Each seed resamples which N images a site labels** (``data.subset_seed = seed``) as well as the
  initialisation and batches; the test split depends only on ``data.split_seed`` and stays fixed.
* **Cost**: every run records wall and process CPU time (``time.process_time()``; an in-process federated
  run is one process: all its sites and the coordinator), and per method the CPU time of its training.

Statistics live in :mod:`bench.stats`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.stats import Estimate

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("bench")

# ----------------------------------------------------------------------------------------- runtime


def setup_runtime(threads: int) -> None:
    """Torch threads, offline Flower, the shared-data folder, quiet library logs (warnings still show)."""
    import torch

    torch.set_num_threads(max(1, threads))
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("FLWR_HOME", str(REPO / ".flwr"))
    os.environ.setdefault("GENSEG_SHARED_DATA", str(REPO.parent / "shared" / "data"))
    import flwr.common.logger  # noqa: F401  (sets up Flower's logger, which we then quieten)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    flower = logging.getLogger("flwr")
    flower.propagate = False  # Flower has its own console handler
    for name in ("flwr", "genseg_fed", "server", "client"):
        logging.getLogger(name).setLevel(logging.WARNING)


def machine_info(threads: int) -> dict[str, Any]:
    """What the numbers were measured on (CPU model, cores, load, torch, commit)."""
    import torch

    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": commit,
    }


def command_line() -> str:
    """The command that is running, as a user would type it."""
    script = Path(sys.argv[0])
    with contextlib.suppress(ValueError):
        script = script.resolve().relative_to(REPO)
    return " ".join(["python", str(script), *sys.argv[1:]])


# ----------------------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class Dataset:
    """A federated benchmark dataset: an experiment YAML (sites + held-out site) and a short note."""

    name: str
    config: str  # relative to the repository
    note: str
    simulated_shift: bool
    overrides: tuple[str, ...] = ()
    per_volume: bool = False  # groups are volumes: also report per-volume (3D) Dice
    family: str = ""  # datasets of one family (the leave-one-site-out splits) are corrected together

    @property
    def path(self) -> Path:
        return REPO / self.config


DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset(
            "skin-loso-dermis",
            "configs/skin3-loso-dermis.yaml",
            "real skin federation, PH2 (dermoscopy) + DermQuest (clinical photos) train, DermIS held out",
            simulated_shift=False,
            family="skin-loso",
        ),
        Dataset(
            "skin-loso-ph2",
            "configs/skin3-loso-ph2.yaml",
            "real skin federation, DermIS + DermQuest (clinical photos) train, PH2 (dermoscopy) held out",
            simulated_shift=False,
            family="skin-loso",
        ),
        Dataset(
            "skin-loso-dermquest",
            "configs/skin3-loso-dermquest.yaml",
            "real skin federation, PH2 + DermIS train, DermQuest held out",
            simulated_shift=False,
            family="skin-loso",
        ),
        Dataset(
            "mni152",
            "configs/default.yaml",
            "embedded MNI152 white-matter sites, real MRI template with SIMULATED acquisition shift",
            simulated_shift=True,
        ),
        Dataset(
            "hippo",
            "bench/configs/hippo-sites.yaml",
            "MSD hippocampus volumes split into sites by volume, SIMULATED acquisition profiles; N = volumes",
            simulated_shift=True,
            per_volume=True,
        ),
    )
}


def get_dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


# ----------------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Job:
    """One way of training: a federated strategy + mode, or pooled training; ``yields`` its method names."""

    name: str
    kind: str  # "fed" or "pooled"
    overrides: tuple[str, ...]
    yields: tuple[str, ...]  # method names this job produces ("local-*" only with baselines)
    baselines: bool = False  # federated only: also train local-only models of the same budget


# Classic augmentation of the real pairs (flips + affine + intensity jitter at level II, the trainer's
# augment.classic). Every job says explicitly whether it uses it, so a changed config default cannot change
# a method: seg-only comes without and with it; aug and genseg keep it on (the config default: GenSeg builds
# on the practitioners' baseline, and its synthetic pairs come on top).
CLASSIC = "augment.classic=true"
NO_CLASSIC = "augment.classic=false"

JOBS: dict[str, Job] = {
    j.name: j
    for j in (
        Job(
            "fedavg-seg-only",
            "fed",
            ("mlo.mode=seg-only", "federation.strategy=fedavg", NO_CLASSIC),
            ("fedavg-seg-only", "local-seg-only"),
            baselines=True,
        ),
        Job(
            "fedavg-seg-only-classic",
            "fed",
            ("mlo.mode=seg-only", "federation.strategy=fedavg", CLASSIC),
            ("fedavg-seg-only-classic", "local-seg-only-classic"),
            baselines=True,
        ),
        Job(
            "fedavg-aug",
            "fed",
            ("mlo.mode=aug", "federation.strategy=fedavg", CLASSIC),
            ("fedavg-aug", "local-aug"),
            baselines=True,
        ),
        Job(
            "fedavg-genseg",
            "fed",
            ("mlo.mode=genseg", "federation.strategy=fedavg", CLASSIC),
            ("fedavg-genseg", "local-genseg"),
            baselines=True,
        ),
        Job(
            "fedprox-genseg",
            "fed",
            ("mlo.mode=genseg", "federation.strategy=fedprox", CLASSIC),
            ("fedprox-genseg",),
        ),
        Job(
            "fedbn-genseg",
            "fed",
            ("mlo.mode=genseg", "federation.strategy=fedavg", "federation.local_norm=true", CLASSIC),
            ("fedbn-genseg",),
        ),
        Job("pooled-seg-only", "pooled", ("mlo.mode=seg-only", NO_CLASSIC), ("pooled-seg-only",)),
        Job(
            "pooled-seg-only-classic", "pooled", ("mlo.mode=seg-only", CLASSIC), ("pooled-seg-only-classic",)
        ),
        Job("pooled-genseg", "pooled", ("mlo.mode=genseg", CLASSIC), ("pooled-genseg",)),
    )
}

METHOD_JOB = {m: j.name for j in JOBS.values() for m in j.yields}
METHODS = tuple(METHOD_JOB)  # in table order
REFERENCE = "fedavg-seg-only"  # paired differences are against this method (and CLASSIC_REFERENCE)
CLASSIC_REFERENCE = "fedavg-seg-only-classic"  # what practitioners use: the headline comparison
GENSEG = "fedavg-genseg"


def jobs_for(methods: Iterable[str]) -> list[Job]:
    """The jobs (in registry order) needed to produce ``methods``."""
    unknown = sorted(set(methods) - set(METHOD_JOB))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    wanted = {METHOD_JOB[m] for m in methods}
    return [j for j in JOBS.values() if j.name in wanted]


# ----------------------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Budget:
    """Local training per site: ``rounds`` x ``local_iterations`` (a local-only or pooled model gets the same)."""

    rounds: int
    local_iterations: int

    @property
    def iterations(self) -> int:
        return self.rounds * self.local_iterations

    def overrides(self) -> tuple[str, ...]:
        return (f"federation.rounds={self.rounds}", f"federation.local_iterations={self.local_iterations}")


# THE converged budget of the headline tables, chosen from bench/convergence.py's curves (FedAvg seg-only,
# with and without classic augmentation, Dice on an inner validation split against local iterations):
# the smallest rounds x local iterations after which the curve no longer rises. Change it here only;
# every study of the converged size and the convergence study's marker follow.
CONVERGED_BUDGET = Budget(rounds=20, local_iterations=50)
CONVERGED_IMAGE_SIZE = 64


@dataclass(frozen=True)
class Size:
    """Training budget and geometry of a study size, and what its numbers may be used for (``note``)."""

    name: str
    overrides: tuple[str, ...]  # applied after the dataset's YAML
    seeds: tuple[int, ...]
    ns: tuple[int, ...]  # labelled images per site (training + validation)
    note: str = ""  # printed at the top of every table of this size

    def budget(self, cfg: Any) -> int:
        """Local iterations per site over the whole run (rounds x local iterations)."""
        return cfg.federation.rounds * cfg.federation.local_iterations


QUICK = Size(
    "quick",
    ("data.image_size=32", "federation.rounds=2", "federation.local_iterations=20"),
    seeds=(0, 1, 2),
    ns=(9,),
    note="QUICK size: a CI-sized smoke run (32 px, 2 x 20 local iterations). It checks that the pipeline "
    "works; every method is far from converged, so its numbers are not evidence for or against one.",
)
MEDIUM = Size(
    "medium",
    ("data.image_size=32",),
    seeds=(0, 1, 2),
    ns=(9,),
    note="MEDIUM size: 32 px, the configs' 5 x 30 local iterations; under-trained (see the convergence study).",
)
CONVERGED = Size(
    "converged",
    (f"data.image_size={CONVERGED_IMAGE_SIZE}", *CONVERGED_BUDGET.overrides()),
    seeds=tuple(range(8)),
    ns=(9, 20, 50),
    note=f"CONVERGED size: {CONVERGED_IMAGE_SIZE} px, {CONVERGED_BUDGET.rounds} rounds x "
    f"{CONVERGED_BUDGET.local_iterations} local iterations (bench/common.py CONVERGED_BUDGET, chosen from "
    "bench/convergence.py); each seed also resamples which images are labelled.",
)
FULL = Size(
    "full",
    (),
    seeds=(0, 1, 2, 3, 4),
    ns=(9, 20, 50),
    note="FULL size: the configs' own size and budget (64 px, 5 x 30 local iterations); under-trained "
    "(see the convergence study).",
)
SIZES = {s.name: s for s in (QUICK, MEDIUM, CONVERGED, FULL)}

PROTOCOL = (
    "N = labelled images per site (training + validation); methods without level III train on the "
    "validation images; each seed resamples which images are labelled (data.subset_seed = seed); "
    "fixed test split (data.split_seed)"
)


# ----------------------------------------------------------------------------------------- run store


@dataclass(frozen=True)
class RunKey:
    dataset: str
    job: str
    n: int
    seed: int

    def folder(self, root: Path) -> Path:
        return root / "runs" / self.dataset / self.job / f"n{self.n}" / f"seed{self.seed}"


RESULT_FILE = "result.json"


class StaleResultError(RuntimeError):
    """A stored run was made with other settings than the ones asked for now."""


def load_result(root: Path, key: RunKey, overrides: Sequence[str] | None = None) -> dict[str, Any] | None:
    """The finished run's result, or None when it has not finished (or its file is unreadable).

    With ``overrides``, a stored result made with other settings raises :class:`StaleResultError`
    (results of different sizes must live in different ``--out`` folders).
    """
    path = key.folder(root) / RESULT_FILE
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        logger.warning("%s is unreadable: the run will be done again", path)
        return None
    if overrides is not None and result.get("run_overrides") != list(overrides):
        raise StaleResultError(
            f"{path} was made with overrides {result.get('run_overrides')}, not {list(overrides)}; "
            "use another --out folder (or delete that run folder to redo it)"
        )
    return result


def write_json(data: Any, path: Path) -> Path:
    """Atomic JSON write (non-finite floats become null), as the library's checkpoints do."""
    from genseg_fed.checkpoint import write_json_atomic

    return write_json_atomic(data, path)


def study_meta(size: Size, threads: int) -> dict[str, Any]:
    """How a study is run (command line, size, machine and its load now), for its ``summary.json``."""
    return {
        "command": command_line(),
        "size": size.name,
        "size_note": size.note,
        "size_overrides": list(size.overrides),
        "protocol": PROTOCOL,
        "machine": machine_info(threads),
    }


def size_banner(size_name: str) -> str:
    """The line every table of a size starts with (what its numbers may be used for)."""
    size = SIZES.get(size_name)
    note = size.note if size and size.note else f"size {size_name}"
    return f"> **{note}**\n"


def finish_study(
    out: Path,
    meta: Mapping[str, Any],
    started: float,
    results: Sequence[Mapping[str, Any]],
    summary: Any,
) -> None:
    """Write ``out/summary.json`` (``meta`` plus timings, and ``summary``), start ``out/tables.md`` with
    the size's banner (a quick table says it is a smoke run) and print it."""
    tables = out / "tables.md"
    if tables.is_file() and meta.get("size"):
        text = tables.read_text()
        note = meta.get("size_note")
        banner = f"> **{note}**\n" if note else size_banner(str(meta["size"]))
        if not text.startswith(banner):
            tables.write_text(banner + "\n" + text)
    meta = {
        **meta,
        "seconds": time.perf_counter() - started,
        "run_seconds": sum(r["seconds"] for r in results),
        "run_cpu_seconds": sum(r.get("cpu_seconds", math.nan) for r in results),
    }
    write_json({"meta": meta, "summary": summary}, out / "summary.json")
    print((out / "tables.md").read_text())
    print(
        f"wrote {out} in {meta['seconds'] / 60:.1f} min (run time of its runs: {meta['run_seconds'] / 60:.1f} min)"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def run_lock(folder: Path) -> Iterator[bool]:
    """Claim ``folder`` for this process; yields False when a live process holds it (run it elsewhere)."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _pid_alive(pid):
                yield False
                return
            lock.unlink(missing_ok=True)  # a stale lock of a killed process
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        try:
            yield True
        finally:
            lock.unlink(missing_ok=True)
        return
    yield False


# ----------------------------------------------------------------------------------------- running


def experiment_overrides(
    dataset: Dataset, size: Size, job: Job, n: int, seed: int, extra: Sequence[str]
) -> list[str]:
    """Every ``key=value`` override of one run, in the order they apply.

    ``n`` is the number of labelled images (groups) per site, training plus validation:
    ``data.n_train = n - data.n_val``. ``seed`` also resamples which ones (``data.subset_seed``).
    """
    before = [*dataset.overrides, *size.overrides, *job.overrides]
    n_val = load_experiment(dataset, [*before, *extra]).data.n_val
    if n <= n_val:
        raise ValueError(
            f"N = {n} labelled images per site leaves no training image after the {n_val} validation "
            f"images (data.n_val) of {dataset.name}; N counts training + validation images"
        )
    return [
        *before,
        f"data.n_train={n - n_val}",
        f"data.subset_seed={seed}",
        f"seed={seed}",
        f"federation.baselines={str(job.baselines).lower()}",
        *extra,
    ]


def load_experiment(dataset: Dataset, overrides: Sequence[str]) -> Any:
    from genseg_fed.config import load_config

    return load_config(dataset.path, list(overrides))


class _ProgressTail:
    """Mirror a run's ``progress.jsonl`` (written by the coordinator) into a tqdm bar, from a thread."""

    def __init__(self, out_dir: Path, desc: str, *, enabled: bool) -> None:
        self.out_dir, self.desc, self.enabled = out_dir, desc, enabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _ProgressTail:
        if self.enabled:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        from tqdm.auto import tqdm

        from genseg_fed.progress import PROGRESS_FILE, ProgressReader

        reader = ProgressReader(self.out_dir / PROGRESS_FILE)
        bar = tqdm(total=1, desc=self.desc, leave=False, position=1, dynamic_ncols=True)
        try:
            while True:
                stopping = self._stop.wait(0.5)
                for event in reader.read():
                    if event.get("event") == "start":
                        bar.reset(total=int(event.get("total", 1)))
                        bar.update(int(event.get("done", 0)))
                    elif event.get("event") == "step":
                        bar.update(int(event.get("n", 1)))
                        bar.set_postfix_str(str(event.get("desc", ""))[:40])
                if stopping:
                    return
        finally:
            bar.close()


def run_federated(
    cfg_path: Path, overrides: Sequence[str], out: Path, *, progress: bool = True
) -> dict[str, Any]:
    """One federated experiment through the in-process transport; resumes from ``out/checkpoint.pt``.

    Returns ``{"history": metrics.json content, "traffic": per-message bytes/seconds, "seconds": wall}``.
    """
    from client.client_app import app as client_app
    from genseg_fed.fed.runconfig import experiment_config
    from server.federation import run_federation
    from server.inprocess import InProcessGrid

    run_config = {
        "config": str(cfg_path.resolve()),
        "overrides": ";".join(overrides),
        "state-dir": str(out / "sites"),
        "out-dir": str(out),
    }
    cfg = experiment_config(run_config)
    n_nodes = len(cfg.data.sites) + len(cfg.data.heldout)
    grid = InProcessGrid.for_partitions(
        client_app, n_nodes=n_nodes, run_config=run_config, keep_replies=False
    )
    resume = (out / "checkpoint.pt").is_file()
    started = time.perf_counter()
    with _ProgressTail(out, f"{cfg.name} {cfg.mlo.mode}", enabled=progress):
        run_federation(grid, cfg, out, resume=resume, site_state_dir=out / "sites")
    seconds = time.perf_counter() - started
    history = json.loads((out / "metrics.json").read_text())
    names = {100 + i: s.name for i, s in enumerate([*cfg.data.sites, *cfg.data.heldout])}
    traffic = [
        {
            "site": names.get(t.node, str(t.node)),
            "type": t.message_type,
            "bytes_down": t.bytes_down,
            "bytes_up": t.bytes_up,
            "seconds": t.seconds,
            "error": t.error,
        }
        for t in grid.traffic
    ]
    return {"history": history, "traffic": traffic, "seconds": seconds, "resumed": resume}


def fed_methods(job: Job, history: Mapping[str, Any], metric: str = "dice") -> dict[str, dict[str, float]]:
    """Per-site test Dice (or ``metric``: ``iou``, ``hd95``) of each method a federated run yields.

    * the job's federated method: the global model after the last round, as each site evaluates it
      (FedBN-style runs: with the site's own normalisation layers; held-out sites: the global model);
    * ``local-<mode>``: at each training site, its local-only model on its own test split; on a held-out
      site, the mean over the training sites' local-only models.
    """
    last = history["rounds"][-1]["evaluate"]
    out: dict[str, dict[str, float]] = {
        job.yields[0]: {
            site: float(m["global"][metric]) for site, m in last.items() if metric in m.get("global", {})
        }
    }
    cross = history.get("crosssite")
    local_names = [m for m in job.yields if m.startswith("local-")]
    if local_names and cross:
        models, sites, heldout = cross["models"], cross["sites"], set(cross["heldout"])
        dice = cross[metric]
        local: dict[str, float] = {}
        for j, site in enumerate(sites):
            if site in heldout:
                values = [
                    dice[i][j]
                    for i, m in enumerate(models)
                    if m.startswith("local:") and dice[i][j] is not None
                ]
                if values:
                    local[site] = float(np.mean(values))
            elif f"local:{site}" in models:
                value = dice[models.index(f"local:{site}")][j]
                if value is not None:
                    local[site] = float(value)
        out[local_names[0]] = local
    return out


def _merge_local(
    per_model: Mapping[str, Mapping[str, float]], sites: Mapping[str, list[str]]
) -> dict[str, dict[str, float]]:
    """``local-x@<site>`` models -> one ``local-x`` method: each training site's own model on its own test
    images, the mean over the local models on a held-out site (as :func:`fed_methods` does)."""
    out: dict[str, dict[str, float]] = {}
    local: dict[str, dict[str, dict[str, float]]] = {}
    for name, scores in per_model.items():
        if "@" in name:
            method, owner = name.split("@", 1)
            local.setdefault(method, {})[owner] = dict(scores)
        else:
            out[name] = dict(scores)
    for method, owners in local.items():
        merged = {site: owners[site][site] for site in sites["train"] if site in owners}
        for site in sites["heldout"]:
            merged[site] = float(np.mean([o[site] for o in owners.values()]))
        out[method] = merged
    return out


def traffic_summary(traffic: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean array bytes per train message each way (per client per round) and per message type."""
    by_type: dict[str, dict[str, list[float]]] = {}
    for t in traffic:
        if t["error"]:
            continue
        rec = by_type.setdefault(t["type"], {"bytes_down": [], "bytes_up": [], "seconds": []})
        for k in rec:
            rec[k].append(float(t[k]))
    return {
        kind: {k: float(np.mean(v)) for k, v in rec.items()} | {"messages": len(rec["seconds"])}
        for kind, rec in by_type.items()
    }


def volume_dice(cfg: Any, models: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, dict[str, float]]:
    """Mean per-volume Dice of each model (shared segmenter weights) on every site's test images.

    A volume's Dice pools its test slices: 2 |P ∩ G| / (|P| + |G|) over all of them. The readers keep
    only slices that contain foreground, so false positives on background-only slices are not counted.
    Computed here, in the benchmark process, from the final weights (in a deployment each site would
    compute it on site; the ClientApp reports per-slice Dice only). Returns ``{model: {site: Dice}}``.
    """
    from genseg_fed.evaluation.metrics import predict_masks
    from genseg_fed.fed.weights import load_shared_weights
    from genseg_fed.local import load_split
    from genseg_fed.mlo.trainer import build_networks
    from genseg_fed.runtime import resolve_device

    device = resolve_device(cfg.device)
    tests = {s.name: load_split(cfg, s).test for s in cfg.data.sites}
    for spec in cfg.data.heldout:
        from genseg_fed.data import load_site

        tests[spec.name] = load_site(
            spec, image_size=cfg.data.image_size, channels=cfg.data.channels, empty_masks=cfg.data.empty_masks
        )
    out: dict[str, dict[str, float]] = {}
    for name, weights in models.items():
        seg = build_networks(
            cfg.model, channels=cfg.data.channels, image_size=cfg.data.image_size, mode="seg-only"
        ).segmenter
        load_shared_weights({"segmenter": seg}, weights)
        seg.to(device)
        for site, data in tests.items():
            pred = predict_masks(seg, data.images, device=device).numpy() > 0.5
            truth = data.masks > 0.5
            groups = np.asarray(data.groups)
            scores = []
            for g in dict.fromkeys(data.groups):
                sel = groups == g
                inter, total = (
                    float((pred[sel] & truth[sel]).sum()),
                    float(pred[sel].sum() + truth[sel].sum()),
                )
                scores.append(1.0 if total == 0 else 2.0 * inter / total)
            out.setdefault(name, {})[site] = float(np.mean(scores))
    return out


def _final_models(job: Job, folder: Path, history: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """The final segmenter weights of each method of a finished federated run (global; local ones per site)."""
    from genseg_fed.checkpoint import load_checkpoint

    models = {job.yields[0]: load_checkpoint(folder / "checkpoint.pt")["weights"]}
    run_key = history["run"]["run_key"]
    for site in history["sites"]:
        path = folder / "sites" / run_key / site / "baseline.pt"
        if path.is_file() and len(job.yields) > 1:
            models[f"{job.yields[1]}@{site}"] = load_checkpoint(path)["models"]["local"]
    return models


def labelled_images(cfg: Any) -> dict[str, list[str]]:
    """``{site: sorted ids}`` of the labelled (training + validation) images of every training site, as
    the library's split gives them for ``cfg`` (the same for every method of a dataset, N and seed)."""
    from genseg_fed.local import load_split

    out = {}
    for spec in cfg.data.sites:
        split = load_split(cfg, spec)
        out[spec.name] = sorted({*split.train.ids, *split.val.ids})
    return out


def fed_costs(job: Job, history: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Training time of each method of a federated run, summed over training sites (and rounds).

    ``train_seconds`` / ``train_cpu_seconds``: wall and process CPU time of the optimisation steps,
    measured on site (the federated method: every round's train metrics; a ``local-*`` method: the
    local-only training the sites report with their baselines). The federated method also gets
    ``round_cpu_seconds``: the sites' whole train handlers (set-up, steps, checkpoint, sample grid).
    """

    def total(records: Sequence[Mapping[str, Any]], key: str) -> float:
        values = [float(r[key]) for r in records if key in r]
        return float(sum(values)) if values else math.nan

    train = [m for r in history["rounds"] for m in r["train"].values()]
    out = {
        job.yields[0]: {
            "train_seconds": total(train, "train_seconds"),
            "train_cpu_seconds": total(train, "train_cpu_seconds"),
            "round_cpu_seconds": total(train, "cpu_seconds"),
        }
    }
    local = [m for m in job.yields if m.startswith("local-")]
    baselines = list(history.get("baselines", {}).values())
    if local and baselines:
        out[local[0]] = {
            "train_seconds": total(baselines, "train_seconds"),
            "train_cpu_seconds": total(baselines, "train_cpu_seconds"),
        }
    return out


def run_job(
    root: Path,
    dataset: Dataset,
    size: Size,
    job: Job,
    n: int,
    seed: int,
    *,
    extra: Sequence[str] = (),
    progress: bool = True,
) -> dict[str, Any] | None:
    """Run one ``(dataset, job, N, seed)`` unless its result exists; returns the result (None: locked)."""
    key = RunKey(dataset.name, job.name, n, seed)
    overrides = experiment_overrides(dataset, size, job, n, seed, extra)
    done = load_result(root, key, overrides)
    if done is not None:
        return done
    folder = key.folder(root)
    with run_lock(folder) as mine:
        if not mine:
            logger.warning("%s is being run by another process: skipped here", folder)
            return None
        started, cpu_started = time.perf_counter(), time.process_time()
        cfg = load_experiment(dataset, overrides)
        result: dict[str, Any] = {
            "dataset": dataset.name,
            "job": job.name,
            "n": n,
            "seed": seed,
            "size": size.name,
            "protocol": PROTOCOL,
            "run_overrides": overrides,
            "overrides": overrides,
            "simulated_shift": dataset.simulated_shift,
            "sites": {
                "train": [s.name for s in cfg.data.sites],
                "heldout": [s.name for s in cfg.data.heldout],
            },
            "labelled": labelled_images(cfg),
        }
        if job.kind == "fed":
            fed = run_federated(dataset.path, overrides, folder, progress=progress)
            history = fed["history"]
            result["methods"] = fed_methods(job, history)
            result["methods_iou"] = fed_methods(job, history, "iou")  # the GenSeg paper reports Jaccard
            result["cost"] = fed_costs(job, history)
            result["rounds"] = [
                {
                    "round": r["round"],
                    "seconds": r["seconds"],
                    "dice": {s: m.get("global", {}).get("dice") for s, m in r["evaluate"].items()},
                    "train_seconds": {s: m.get("seconds") for s, m in r["train"].items()},
                }
                for r in history["rounds"]
            ]
            result["crosssite"] = history.get("crosssite")
            result["counts"] = {
                s: {k: v for k, v in d.items() if k.startswith("n_")} for s, d in history["sites"].items()
            }
            result["traffic"] = traffic_summary(fed["traffic"])
            result["resumed"] = fed["resumed"]
            if dataset.per_volume:
                per_model = volume_dice(cfg, _final_models(job, folder, history))
                result["methods_per_volume"] = _merge_local(per_model, result["sites"])
        else:
            from genseg_fed.local import train_pooled

            sites = len(cfg.data.sites)
            iterations = size.budget(cfg) * sites  # the federation's total budget, in one place
            cfg = load_experiment(dataset, [*overrides, f"mlo.iterations={iterations}"])
            result["overrides"] = [*overrides, f"mlo.iterations={iterations}"]
            metrics = train_pooled(cfg, folder, progress=progress)
            result["methods"] = {job.yields[0]: {s: float(m["dice"]) for s, m in metrics["test"].items()}}
            result["methods_iou"] = {job.yields[0]: {s: float(m["iou"]) for s, m in metrics["test"].items()}}
            result["cost"] = {
                job.yields[0]: {
                    "train_seconds": metrics["train_seconds"],
                    "train_cpu_seconds": metrics["train_cpu_seconds"],
                }
            }
            result["counts"] = metrics["counts"]
            if dataset.per_volume:
                import torch

                weights = {
                    f"segmenter/{k}": v.numpy() for k, v in torch.load(folder / "segmenter.pt").items()
                }
                result["methods_per_volume"] = volume_dice(cfg, {job.yields[0]: weights})
        result["seconds"] = time.perf_counter() - started
        # this process, all its threads, user + system: the whole run (all sites, coordinator, evaluation)
        result["cpu_seconds"] = time.process_time() - cpu_started
        result["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        result["finished"] = time.time()
        write_json(result, folder / RESULT_FILE)
        return result


def run_grid(
    root: Path,
    datasets: Sequence[Dataset],
    size: Size,
    jobs: Sequence[Job],
    ns: Sequence[int],
    seeds: Sequence[int],
    *,
    extra: Sequence[str] = (),
    progress: bool = True,
    dry_run: bool = False,
) -> list[dict[str, Any]]:
    """Run every ``(dataset, job, N, seed)`` (N beyond what a dataset allows is skipped); finished runs load.

    ``dry_run``: only print the plan (runs finished and still to do) and return no results.
    """
    from tqdm.auto import tqdm

    plan = []
    for dataset in datasets:
        limit = max_n(dataset, size)
        for n in ns:
            if n > limit:
                logger.warning(
                    "%s: N=%d skipped (at most %d labelled images per site)", dataset.name, n, limit
                )
                continue
            plan += [(dataset, job, n, seed) for seed in seeds for job in jobs]
    if dry_run:
        done = [
            p for p in plan if (RunKey(p[0].name, p[1].name, p[2], p[3]).folder(root) / RESULT_FILE).is_file()
        ]
        for dataset, job, n, seed in plan:
            state = "done" if (dataset, job, n, seed) in done else "to do"
            print(f"{state:6} {dataset.name} {job.name} N={n} seed={seed}")
        print(f"{len(plan)} runs in {root}: {len(done)} done, {len(plan) - len(done)} to do")
        return []
    results = []
    with tqdm(total=len(plan), desc="runs", position=0, dynamic_ncols=True, disable=not progress) as bar:
        for dataset, job, n, seed in plan:
            bar.set_postfix_str(f"{dataset.name} {job.name} N={n} seed={seed}")
            result = run_job(root, dataset, size, job, n, seed, extra=extra, progress=progress)
            if result is not None:
                results.append(result)
            bar.update()
    return results


def check_plan(datasets: Sequence[Dataset], size: Size, jobs: Sequence[Job], extra: Sequence[str]) -> None:
    """Load every (dataset, job) config once before anything runs, so a bad override (e.g. a config key
    this checkout does not have yet) stops the study at once with the config's own message."""
    from genseg_fed.config import ConfigError

    for dataset in datasets:
        for job in jobs:
            try:
                load_experiment(dataset, [*dataset.overrides, *size.overrides, *job.overrides, *extra])
            except ConfigError as exc:
                raise ConfigError(f"{dataset.name} / {job.name}: {exc}") from exc


def max_n(dataset: Dataset, size: Size) -> int:
    """The largest N (labelled groups per site) every training site of ``dataset`` allows: the groups
    left after its test split."""
    from genseg_fed.local import load_split

    cfg = load_experiment(dataset, [*dataset.overrides, *size.overrides, "data.n_train=null"])
    splits = [load_split(cfg, s) for s in cfg.data.sites]
    return min(len(set(sp.train.groups)) + len(set(sp.val.groups)) for sp in splits)


# ----------------------------------------------------------------------------------------- rows


def method_rows(
    results: Iterable[Mapping[str, Any]], *, per_volume: bool = False, iou: bool = False
) -> list[dict[str, Any]]:
    """Long table: one row per (dataset, method, N, seed, site) with the site's role and test Dice
    (per image; ``per_volume``: per volume, for the runs that have it; ``iou``: the IoU (Jaccard) of the
    same models, in the ``dice`` column)."""
    key = "methods_per_volume" if per_volume else "methods_iou" if iou else "methods"
    rows = []
    for r in results:
        heldout = set(r["sites"]["heldout"])
        methods = r.get(key, {})
        for method, per_site in methods.items():
            for site, dice in per_site.items():
                rows.append(
                    {
                        "dataset": r["dataset"],
                        "method": method,
                        "n": r["n"],
                        "seed": r["seed"],
                        "site": site,
                        "role": "heldout" if site in heldout else "train",
                        "dice": dice,
                    }
                )
    return rows


def per_seed_scores(
    rows: Iterable[Mapping[str, Any]],
) -> dict[tuple[str, str, int], dict[int, dict[str, float]]]:
    """``{(dataset, method, N): {seed: {"train_mean": .., "heldout": .., <site>: ..}}}``.

    ``train_mean`` is the unweighted mean over training sites of each site's mean test Dice; ``heldout``
    the mean over held-out sites (one in the leave-one-site-out datasets).
    """
    out: dict[tuple[str, str, int], dict[int, dict[str, float]]] = {}
    grouped: dict[tuple[str, str, int, int], list[Mapping[str, Any]]] = {}
    for row in rows:
        grouped.setdefault((row["dataset"], row["method"], row["n"], row["seed"]), []).append(row)
    for (dataset, method, n, seed), site_rows in grouped.items():
        scores = {row["site"]: float(row["dice"]) for row in site_rows}
        train = [row["dice"] for row in site_rows if row["role"] == "train"]
        held = [row["dice"] for row in site_rows if row["role"] == "heldout"]
        scores["train_mean"] = float(np.mean(train)) if train else math.nan
        scores["heldout"] = float(np.mean(held)) if held else math.nan
        out.setdefault((dataset, method, n), {})[seed] = scores
    return out


# ----------------------------------------------------------------------------------------- output


def fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def pm(est: Estimate, digits: int = 3) -> str:
    """``mean ± std`` (std over seeds)."""
    if est.n == 0:
        return "–"
    if est.n < 2:
        return f"{est.mean:.{digits}f}"
    return f"{est.mean:.{digits}f} ± {est.std:.{digits}f}"


def ci(est: Estimate, digits: int = 3, signed: bool = True) -> str:
    """``+0.012 [-0.010, +0.034]``."""
    if est.n == 0:
        return "–"
    f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    if est.n < 2:
        return f.format(est.mean) + " (1 seed)"
    return f"{f.format(est.mean)} [{f.format(est.lo)}, {f.format(est.hi)}]"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: fmt(v, 6) if isinstance(v, float) else v for k, v in row.items()})
    return path


@dataclass
class StudyOutput:
    """Where a study writes: ``<results>/<study>/`` (tables, plots, summary) next to the shared run store."""

    root: Path
    study: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        path = self.root / self.study
        path.mkdir(parents=True, exist_ok=True)
        return path
