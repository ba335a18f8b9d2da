"""``genseg-fed certs | superlink | supernode | submit | status``: the deployment subcommands.

Registered by :func:`add_commands` from :mod:`genseg_fed.cli`. ``superlink`` and ``supernode`` check
their inputs, print the exact Flower command line, then *replace themselves* with it (``exec``), so a
service manager (systemd, docker) supervises the Flower process directly.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .certs import (
    CertError,
    NodeKeyPair,
    SuperLinkCerts,
    create_node_keys,
    create_superlink_certs,
    describe_certificate,
)
from .launch import (
    COMPLETED,
    DEFAULT_CONNECTION,
    DEFAULT_PORT,
    DEFAULT_RUNTIME_PORT,
    DeployError,
    SuperLinkOptions,
    SuperNodeOptions,
    ensure_runtime_secret,
    offline_env,
    run_status,
    submit_run,
    superlink_command,
    supernode_command,
    wait_for_run,
    write_connection,
)

__all__ = ["add_commands"]

COORDINATOR_DIR = Path("~/.genseg-fed/superlink")
SITE_DIR = Path("~/.genseg-fed/state")  # same default as genseg_fed.fed.runconfig
EXIT_FAILED, EXIT_NOT_FINISHED = 1, 3


def _flwr_home(args: argparse.Namespace, state_dir: Path) -> Path:
    if args.flwr_home:
        return Path(args.flwr_home).expanduser().resolve()
    if os.environ.get("FLWR_HOME"):
        return Path(os.environ["FLWR_HOME"]).expanduser().resolve()
    return (Path(state_dir).expanduser() / "flwr-home").resolve()


def _exec(cmd: Sequence[str], *, env: dict[str, str], cwd: Path, dry_run: bool) -> int:
    shown = {
        k: env[k] for k in ("FLWR_HOME", "FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK") if k in env
    }
    print("environment: " + " ".join(f"{k}={shlex.quote(v)}" for k, v in shown.items()), flush=True)
    print(f"working folder: {cwd}", flush=True)
    print("command: " + shlex.join(cmd), flush=True)
    if dry_run:
        return 0
    os.chdir(cwd)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], list(cmd), env)
    raise AssertionError("unreachable")  # pragma: no cover


def _fail(command: str, exc: Exception) -> int:
    print(f"genseg-fed {command}: error: {exc}", file=sys.stderr)
    return 2


# ------------------------------------------------------------------------------------------------ certs


def _ssh_fingerprint(path: Path) -> str:
    """``SHA256:...`` of an OpenSSH public key, as ``ssh-keygen -l`` prints it (to compare by phone)."""
    blob = base64.b64decode(path.read_text().split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def cmd_certs(args: argparse.Namespace) -> int:
    try:
        if args.action == "init":
            files = create_superlink_certs(
                args.out, sans=args.san, days=args.days, force=args.force, reuse_ca=args.reuse_ca
            )
            info = describe_certificate(files.cert)
            print(f"CA certificate:        {files.ca_cert}   (give this file to every hospital)")
            print(
                f"CA private key:        {files.ca_key}   (0600; keep it offline, it signs SuperLink certificates)"
            )
            print(f"SuperLink certificate: {files.cert}   names {', '.join(info['sans'])}")
            print(f"SuperLink private key: {files.key}   (0600)")
            print(f"CA fingerprint:        {describe_certificate(files.ca_cert)['sha256']}")
            if args.node:
                for pair in create_node_keys(Path(args.out) / "nodes", args.node, force=args.force):
                    _print_pair(pair)
        elif args.action == "node":
            for pair in create_node_keys(args.out, args.names, force=args.force):
                _print_pair(pair)
        else:  # show
            for path in args.files:
                if path.suffix == ".pub":
                    kind = path.read_text().split()[0]
                    print(f"{path}: {kind} {_ssh_fingerprint(path)}")
                else:
                    print(f"{path}: {json.dumps(describe_certificate(path), indent=2)}")
    except (CertError, OSError, ValueError) as exc:
        return _fail("certs", exc)
    return 0


def _print_pair(pair: NodeKeyPair) -> None:
    print(
        f"{pair.name}: private key {pair.private_key} (0600, stays at the hospital), public key "
        f"{pair.public_key} (send to the coordinator), {_ssh_fingerprint(pair.public_key)}"
    )


# ------------------------------------------------------------------------------------------------ processes


def cmd_superlink(args: argparse.Namespace) -> int:
    state = Path(args.state_dir).expanduser().resolve()
    database = None if args.no_database else (args.database or state / "superlink.db")
    opts = SuperLinkOptions(
        certs=args.certs,
        host=args.host,
        port=args.port,
        database=database,
        supernode_auth=not args.no_supernode_auth,
        insecure=args.insecure,
    )
    try:
        cmd = superlink_command(opts)
        flwr_home = _flwr_home(args, state)
        address = (
            args.address or f"{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
        )
        ca = None if args.insecure else SuperLinkCerts.in_dir(Path(args.certs).expanduser().resolve()).ca_cert
        if args.dry_run:
            print(
                f"would write the flwr CLI connection [superlink.{args.connection}] -> {address} into {flwr_home}"
            )
        else:
            state.mkdir(parents=True, exist_ok=True, mode=0o700)
            config = write_connection(flwr_home, args.connection, address, ca_cert=ca)
            print(f"flwr CLI connection [superlink.{args.connection}] -> {address} written to {config}")
        return _exec(cmd, env=offline_env(flwr_home), cwd=state, dry_run=args.dry_run)
    except (DeployError, OSError) as exc:
        return _fail("superlink", exc)


def cmd_supernode(args: argparse.Namespace) -> int:
    state = Path(args.state_dir).expanduser().resolve()
    opts = SuperNodeOptions(
        superlink=args.superlink,
        site_name=args.site_name,
        state_dir=state,
        data_path=args.data,
        orientation=args.orientation,
        ca_cert=args.ca,
        key=args.key,
        port=args.port,
        insecure=args.insecure,
        no_auth=args.no_auth,
        warm=not args.plain,
        max_wait_time=args.max_wait_time,
        runtime_secret=None if args.plain else state / "runtime.secret",
    )
    try:
        cmd = supernode_command(opts)
        if not args.dry_run:
            state.mkdir(parents=True, exist_ok=True, mode=0o700)
            if opts.runtime_secret is not None:
                ensure_runtime_secret(opts.runtime_secret)
        flwr_home = _flwr_home(args, state)
        if not args.plain:
            module = [sys.executable, "-m", "genseg_fed.deploy.supernode"]
            cmd = [
                *module,
                "--warm",
                "--poll-interval",
                str(args.poll_interval),
                "--node-id-file",
                str(state / "supernode-id"),
                "--",
                *cmd[1:],
            ]
        return _exec(cmd, env=offline_env(flwr_home), cwd=state, dry_run=args.dry_run)
    except (DeployError, OSError) as exc:
        return _fail("supernode", exc)


# ------------------------------------------------------------------------------------------------ runs


def _app_dir(args: argparse.Namespace) -> Path:
    from ..simulation import SimulationError, check_app_dir, find_app_dir

    try:
        return check_app_dir(args.app) if args.app else find_app_dir()
    except SimulationError as exc:
        raise DeployError(str(exc)) from None


def _config_value(config: Path, app_dir: Path) -> str:
    """The run config's ``config``: relative to the app folder when inside it (it travels in the bundle)."""
    path = Path(config).expanduser().resolve()
    if not path.is_file():
        raise DeployError(f"experiment file {path} does not exist")
    try:
        return str(path.relative_to(app_dir))
    except ValueError:
        print(
            f"warning: {path} is outside the app folder {app_dir}, so it is not in the app bundle; every "
            "hospital must have the same file at this path (fine on one machine, not in a real federation)",
            file=sys.stderr,
        )
        return str(path)


def _status_code(info: dict[str, Any]) -> int:
    status = str(info.get("status", ""))
    if status == COMPLETED:
        return 0
    return EXIT_FAILED if status.startswith("finished") else EXIT_NOT_FINISHED


def _report(info: dict[str, Any]) -> None:
    print(
        f"run {info.get('run-id')}: {info.get('status')} after {float(info.get('elapsed') or 0):.0f} s"
        + (f" ({info['status-details']})" if info.get("status-details") not in (None, "", "N/A") else "")
    )


def cmd_submit(args: argparse.Namespace) -> int:
    try:
        app_dir = _app_dir(args)
        flwr_home = _flwr_home(args, COORDINATOR_DIR)
        workdir = flwr_home / "submissions"
        run_config: dict[str, Any] = {
            "config": _config_value(args.config, app_dir),
            "overrides": ";".join(args.overrides),
            "resume": bool(args.resume),
        }
        if args.out_dir:
            run_config["out-dir"] = str(Path(args.out_dir).expanduser().resolve())
        env = offline_env(flwr_home)
        run_id = submit_run(
            app_dir=app_dir, connection=args.connection, run_config=run_config, env=env, workdir=workdir
        )
        print(f"submitted run {run_id} to [superlink.{args.connection}]", flush=True)
        if not args.wait:
            return 0
        info = wait_for_run(run_id, connection=args.connection, env=env, cwd=workdir, timeout=args.timeout)
    except DeployError as exc:
        return _fail("submit", exc)
    _report(info)
    return _status_code(info)


def cmd_status(args: argparse.Namespace) -> int:
    try:
        flwr_home = _flwr_home(args, COORDINATOR_DIR)
        env = offline_env(flwr_home)
        cwd = flwr_home
        if args.wait:
            info = wait_for_run(
                args.run_id, connection=args.connection, env=env, cwd=cwd, timeout=args.timeout
            )
        else:
            info = run_status(args.run_id, connection=args.connection, env=env, cwd=cwd)
    except DeployError as exc:
        return _fail("status", exc)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _report(info)
    return _status_code(info)


# ------------------------------------------------------------------------------------------------ parser


def _flwr_home_arg(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--flwr-home", type=Path, help=f"Flower's home folder (default: $FLWR_HOME, else {default}/flwr-home)"
    )


def add_commands(sub: Any) -> None:
    """Add the deployment subcommands to ``genseg-fed``'s subparsers."""
    p = sub.add_parser(
        "certs",
        help="TLS certificates for the SuperLink and SuperNode authentication keys for the hospitals",
        description="`init` (coordinator): a CA and the SuperLink's certificate, optionally key pairs for "
        "hospitals. `node` (hospital): this hospital's SuperNode key pair. `show`: names, validity and "
        "fingerprints (compare them by phone before trusting a file). Existing files are never overwritten "
        "without --force; private keys are written with mode 0600.",
    )
    acts = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = acts.add_parser("init", help="CA + SuperLink certificate (+ hospital keys with --node)")
    a.add_argument(
        "--out", type=Path, required=True, help="folder for ca.crt, ca.key, superlink.crt, superlink.key"
    )
    a.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="HOST",
        help="IP or DNS name SuperNodes use to reach the SuperLink (repeatable); 127.0.0.1 and localhost "
        "are always included",
    )
    a.add_argument(
        "--node", action="append", default=[], metavar="NAME", help="also make OUT/nodes/NAME.key/.pub"
    )
    a.add_argument("--days", type=int, default=825, help="SuperLink certificate validity (default 825 days)")
    a.add_argument(
        "--reuse-ca", action="store_true", help="keep the existing CA; only issue a new SuperLink certificate"
    )
    a.add_argument("--force", action="store_true", help="overwrite existing files")
    a = acts.add_parser("node", help="SuperNode key pair(s): NAME.key (stays on site) and NAME.pub")
    a.add_argument("names", nargs="+", metavar="NAME")
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--force", action="store_true", help="overwrite existing files")
    a = acts.add_parser("show", help="describe certificates (.crt) and public keys (.pub)")
    a.add_argument("files", nargs="+", type=Path)
    p.set_defaults(func=cmd_certs)

    p = sub.add_parser(
        "superlink",
        help="start the coordinator's Flower SuperLink (TLS and SuperNode authentication on)",
        description="Check the certificates against --host, write the flwr CLI connection, print the "
        "flower-superlink command and run it (offline: no telemetry, no update check, no runtime "
        "dependency installation). State (registered hospitals, runs) is kept in a SQLite database.",
    )
    p.add_argument("--certs", type=Path, help="folder made by `genseg-fed certs init`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTPS port (default {DEFAULT_PORT})")
    p.add_argument(
        "--state-dir", type=Path, default=COORDINATOR_DIR, help=f"working folder (default {COORDINATOR_DIR})"
    )
    p.add_argument("--database", type=Path, help="SQLite file (default STATE_DIR/superlink.db)")
    p.add_argument("--no-database", action="store_true", help="keep state in memory (lost on restart)")
    p.add_argument(
        "--connection", default=DEFAULT_CONNECTION, help="name of the flwr CLI connection to write"
    )
    p.add_argument("--address", help="HOST:PORT the flwr CLI uses (default: --host:--port)")
    p.add_argument(
        "--insecure", action="store_true", help="no TLS (loopback debugging only; prints a warning)"
    )
    p.add_argument("--no-supernode-auth", action="store_true", help="accept any SuperNode that trusts the CA")
    p.add_argument("--dry-run", action="store_true", help="check and print the command, do not run it")
    _flwr_home_arg(p, str(COORDINATOR_DIR))
    p.set_defaults(func=cmd_superlink)

    p = sub.add_parser(
        "supernode",
        help="start a hospital's Flower SuperNode pointed at its own data folder",
        description="Check the CA file, the hospital's key and its data folder, print the command and run "
        "the SuperNode. By default with the warm ClientApp runner (torch imported once, not per message) "
        "and a 0.5 s idle poll; --plain runs the unmodified flower-supernode.",
    )
    p.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the coordinator's SuperLink")
    p.add_argument("--ca", type=Path, help="the federation's ca.crt (from the coordinator)")
    p.add_argument("--key", type=Path, help="this hospital's private key (genseg-fed certs node NAME)")
    p.add_argument("--site-name", required=True, help="this site's name in the experiment (data.sites)")
    p.add_argument("--data", type=Path, help="site folder with images/ and masks/")
    p.add_argument("--orientation", choices=("axial", "coronal", "sagittal"), help="slicing axis for volumes")
    p.add_argument(
        "--state-dir", type=Path, default=SITE_DIR, help=f"on-site training state (default {SITE_DIR})"
    )
    p.add_argument(
        "--port", type=int, default=DEFAULT_RUNTIME_PORT, help="local Runtime API port (127.0.0.1)"
    )
    p.add_argument(
        "--plain", action="store_true", help="unmodified flower-supernode (one process per message)"
    )
    p.add_argument(
        "--poll-interval", type=float, default=0.5, help="idle poll of the SuperLink, s (Flower: 3)"
    )
    p.add_argument("--max-wait-time", type=float, help="give up connecting after this many seconds")
    p.add_argument("--insecure", action="store_true", help="no TLS (loopback debugging only)")
    p.add_argument(
        "--no-auth", action="store_true", help="no SuperNode key (SuperLink without authentication)"
    )
    p.add_argument("--dry-run", action="store_true", help="check and print the command, do not run it")
    _flwr_home_arg(p, "STATE_DIR")
    p.set_defaults(func=cmd_supernode)

    p = sub.add_parser(
        "submit",
        help="submit a federated run to the SuperLink (and wait for its final status)",
        description="Bundle this checkout's Flower app and submit it with `flwr run`. The experiment YAML "
        "should lie inside the app folder (e.g. deploy/experiment.yaml): the bundle carries it to every "
        "hospital. With --wait, exits 0 only if the run ends finished:completed (1: failed or stopped, "
        "3: not finished within --timeout); `flwr run` itself exits 0 even for failed runs.",
    )
    p.add_argument("--config", "-c", type=Path, required=True, help="experiment YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--out-dir", type=Path, help="run folder on the coordinator (default runs/<name>-<run id>)"
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir after its last round")
    p.add_argument("--connection", default=DEFAULT_CONNECTION)
    p.add_argument("--app", type=Path, help="Flower app folder (default: this checkout)")
    p.add_argument("--wait", action="store_true", help="wait for the run to finish")
    p.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
    _flwr_home_arg(p, str(COORDINATOR_DIR))
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser(
        "status",
        help="a run's status from the SuperLink (exit 0: completed, 1: failed/stopped, 3: not finished)",
    )
    p.add_argument("run_id", type=int)
    p.add_argument("--connection", default=DEFAULT_CONNECTION)
    p.add_argument("--wait", action="store_true")
    p.add_argument("--timeout", type=float)
    p.add_argument("--json", action="store_true", help="print Flower's whole JSON entry")
    _flwr_home_arg(p, str(COORDINATOR_DIR))
    p.set_defaults(func=cmd_status)
