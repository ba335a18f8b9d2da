"""The ``genseg-fed`` command line.

Each subcommand is a thin layer over a library function; ``genseg-fed <command> --help`` explains it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .config import Config, ConfigError, SiteSpec, config_to_dict, load_config
from .deploy.cli import add_commands as add_deploy_commands

__all__ = ["main"]

logger = logging.getLogger("genseg_fed")

EPILOG = """\
examples:
  genseg-fed simulate --config configs/default.yaml --out runs/demo
  genseg-fed simulate --set federation.strategy=fedprox --set mlo.mode=aug --out runs/aug
  genseg-fed train-local --config configs/default.yaml --site hospital-a
  genseg-fed train-local --config configs/default.yaml --site /data/my_site --set mlo.mode=aug
  genseg-fed check-site /data/my_site --image-size 128 --channels 3
  genseg-fed show-config --config configs/default.yaml --set data.n_train=20
  genseg-fed certs init --out certs --san fl.example.org     (deployment: see deploy/README.md)

A site folder holds images/ and masks/ with matching file names (PNG, JPG, TIFF, BMP or NIfTI), and
optionally patients.csv (header file,patient) saying which images belong to one patient.
Every config key can be overridden with --set section.key=value (values are YAML).
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, help="YAML experiment file (default: built-in defaults)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set mlo.inner_lr=1e-3 (repeatable)",
    )
    p.add_argument("--device", help="auto (CUDA when present), cpu, cuda or cuda:N; overrides the config")


def _load(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if getattr(args, "device", None):
        overrides.append(f"device={args.device}")
    return load_config(args.config, overrides)


def _resolve_site(cfg: Config, site: str) -> SiteSpec:
    """A site name from the config, or a folder path (a hospital's own data)."""
    for spec in (*cfg.data.sites, *cfg.data.heldout):
        if spec.name == site:
            return spec
    path = Path(site)
    if path.exists() or "/" in site or site.startswith("."):
        return SiteSpec(name=path.resolve().name, source="folder", path=str(path), orientation="axial")
    names = [s.name for s in (*cfg.data.sites, *cfg.data.heldout)]
    raise ConfigError(f"--site {site!r} is neither a site in the config ({names}) nor an existing folder")


def cmd_train_local(args: argparse.Namespace) -> int:
    from .local import train_local

    cfg = _load(args)
    site = _resolve_site(cfg, args.site)
    out = args.out or Path("runs") / f"local-{site.name}-{cfg.mlo.mode}"
    metrics = train_local(cfg, site, out, resume=args.resume, progress=not args.no_progress)
    test = metrics["test"]
    print(
        f"{site.name} [{cfg.mlo.mode}] test Dice {test['dice']:.3f} ± {test['dice_std']:.3f}, "
        f"IoU {test['iou']:.3f}, HD95 {test['hd95']:.1f} px on {int(test['n'])} images "
        f"({metrics['iterations']} iterations, {metrics['train_seconds']:.0f} s) -> {out}/metrics.json"
    )
    if metrics.get("privacy"):
        dp = metrics["privacy"]
        print(
            f"differential privacy: epsilon {dp['epsilon']:.2f} (target {dp['epsilon-target']:.2f}), delta {dp['delta']:g}"
        )
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from .simulation import SimulationError, find_app_dir, run_simulation

    cfg = _load(args)  # validate before starting anything
    out = (args.out or Path("runs") / cfg.name).resolve()
    config = (args.config or Path(__file__).resolve().parents[1] / "configs" / "default.yaml").resolve()
    overrides = list(args.overrides) + ([f"device={args.device}"] if args.device else [])
    n_nodes = args.supernodes or len(cfg.data.sites) + len(cfg.data.heldout)
    try:
        result = run_simulation(
            app_dir=args.app or find_app_dir(),
            out_dir=out,
            num_supernodes=n_nodes,
            run_config={
                "config": str(config),
                "overrides": ";".join(overrides),
                "out-dir": str(out),
                "state-dir": str(out / "sites"),
                "resume": bool(args.resume),
            },
            progress=not args.no_progress,
            timeout=args.timeout,
            cpus_per_client=args.cpus_per_client,
        )
    except SimulationError as exc:
        print(f"genseg-fed simulate: the run failed: {exc}", file=sys.stderr)
        return 1
    print(f"finished in {result.seconds / 60:.1f} min: {out / 'report.md'}")
    _print_summary(out / "metrics.json")
    return 0


def _print_summary(metrics_path: Path) -> None:
    """The cross-site Dice table of a finished run, for the terminal."""
    import json

    if not metrics_path.is_file():
        return
    cross = json.loads(metrics_path.read_text()).get("crosssite") or {}
    if not cross:
        return
    sites = [f"{s}*" if s in cross["heldout"] else s for s in cross["sites"]]
    width = max(len(m) for m in cross["models"]) + 2
    print("test Dice" + " " * (width - 9) + "".join(f"{s:>13}" for s in sites) + "   (* held-out)")
    for model, row in zip(cross["models"], cross["dice"], strict=True):
        cells = "".join(f"{v:13.3f}" if v is not None else f"{'-':>13}" for v in row)
        print(f"{model:<{width}}{cells}")


def cmd_train_pooled(args: argparse.Namespace) -> int:
    from .local import train_pooled

    cfg = _load(args)
    out = args.out or Path("runs") / f"pooled-{cfg.mlo.mode}"
    metrics = train_pooled(cfg, out, progress=not args.no_progress)
    for site, test in metrics["test"].items():
        tag = " (held-out)" if site in metrics["heldout"] else ""
        print(
            f"{site}{tag}: test Dice {test['dice']:.3f} ± {test['dice_std']:.3f} on {int(test['n'])} images"
        )
    print(f"-> {out}/metrics.json")
    return 0


def cmd_check_site(args: argparse.Namespace) -> int:
    from .data import load_site

    spec = SiteSpec(
        name=Path(args.path).resolve().name, source="folder", path=str(args.path), orientation=args.axis
    )
    data = load_site(spec, image_size=args.image_size, channels=args.channels, empty_masks=args.empty_masks)
    fg = float(data.masks.mean()) if len(data) else 0.0
    patients = len(set(data.groups))
    print(f"{spec.name}: {patients} patients, {len(data)} images, foreground {fg:.3f}")
    print(data.description)
    if patients == len(data) and list(data.groups) == list(data.ids) and len(data) > 1:
        print(
            f"warning: cannot tell patients apart: each of the {len(data)} images counts as its own patient. "
            f"If a patient has several images, list them in {Path(args.path) / 'patients.csv'} "
            "(header 'file,patient', one row per image) or use a site's patient_pattern: otherwise splits "
            "can put one patient in both train and test, and differential privacy protects single images, "
            "not patients.",
            file=sys.stderr,
        )
    return 0


def cmd_show_config(args: argparse.Namespace) -> int:
    import yaml

    print(yaml.safe_dump(config_to_dict(_load(args)), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genseg-fed",
        description="Federated GenSeg: synthetic image/mask pairs from a generator tuned by multi-level "
        "optimisation, trained across hospitals with Flower.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "simulate",
        help="federated run on this machine: a real Flower SuperLink with simulated SuperNodes",
        description="Start a loopback Flower SuperLink in simulation mode, run the genseg-fed ServerApp and one "
        "virtual SuperNode (ClientApp) per site, wait for the run and stop everything. Writes report.md, "
        "metrics.json, checkpoint.pt, plots and the Flower logs into --out. With --resume, a stopped run "
        "continues after its last completed round.",
    )
    _add_config_args(p)
    p.add_argument("--out", type=Path, help="run folder (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument(
        "--supernodes", "-n", type=int, help="virtual SuperNodes (default: one per site in the config)"
    )
    p.add_argument("--cpus-per-client", type=int, default=2, help="CPUs Ray gives each ClientApp (default 2)")
    p.add_argument("--timeout", type=float, help="stop the run after this many seconds")
    p.add_argument("--app", type=Path, help="Flower app folder (default: this checkout)")
    p.add_argument("--no-progress", action="store_true", help="stream Flower's log instead of a progress bar")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser(
        "train-local",
        help="train on one site only (no federation) and evaluate on its test split",
        description="Train GenSeg (or the seg-only / aug baselines, see mlo.mode) on one site. Writes "
        "config.yaml, checkpoint.pt, segmenter.pt, generator.pt, metrics.json and samples.png.",
    )
    _add_config_args(p)
    p.add_argument(
        "--site", required=True, help="a site name from the config, or a folder with images/ + masks/"
    )
    p.add_argument("--out", type=Path, help="run folder (default: runs/local-<site>-<mode>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt if present")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.set_defaults(func=cmd_train_local)

    p = sub.add_parser(
        "train-pooled",
        help="upper-bound baseline: all sites' training images pooled in one place (no federation)",
        description="Pool every site's train and validation splits, train one model, test it on each site's test "
        "split and on the held-out sites. This is what federation avoids doing; it bounds what it can reach.",
    )
    _add_config_args(p)
    p.add_argument("--out", type=Path, help="run folder (default: runs/pooled-<mode>)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_pooled)

    p = sub.add_parser(
        "check-site",
        help="validate a hospital's data folder and summarise it",
        description="Read images/ and masks/ (and patients.csv) exactly as training would, report problems with "
        "clear errors, and count patients and images separately (a patient is the unit of splits and of DP).",
    )
    p.add_argument("path", type=Path, help="folder with images/ and masks/ subfolders")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--channels", type=int, choices=(1, 3), default=1)
    p.add_argument(
        "--axis", choices=("axial", "coronal", "sagittal"), default="axial", help="slicing axis for volumes"
    )
    p.add_argument("--empty-masks", choices=("error", "skip", "keep"), default="error")
    p.set_defaults(func=cmd_check_site)

    p = sub.add_parser("show-config", help="print the resolved config (file + overrides) as YAML")
    _add_config_args(p)
    p.set_defaults(func=cmd_show_config)

    add_deploy_commands(sub)  # certs, superlink, supernode, submit, status (see deploy/README.md)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``genseg-fed`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        # Bad input: one clear line, no traceback (use -v to see where it came from).
        if args.verbose:
            logger.exception("failed")
        print(f"genseg-fed {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
