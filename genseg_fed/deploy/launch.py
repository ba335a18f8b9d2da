"""Validated command lines and environments for the Flower processes of a real deployment.

What ``genseg-fed superlink``, ``genseg-fed supernode``, ``genseg-fed submit`` and ``genseg-fed status``
run. Everything that is not deployment-specific (offline environment, finding Flower's executables,
reading the ``flwr`` CLI's JSON, locking ``$FLWR_HOME/config.toml``) is shared with ``genseg-fed simulate``
(:mod:`genseg_fed.simulation`).

Secure by default: the SuperLink runs with TLS and SuperNode authentication unless ``insecure=True``
is asked for explicitly, which logs a warning; a SuperNode without a CA certificate or without an
authentication key is refused unless it is explicitly insecure too.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import subprocess
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from .. import simulation as _sim
from .certs import CertError, SuperLinkCerts, check_node_key, check_superlink_certs

__all__ = [
    "COMPLETED",
    "DEFAULT_CONNECTION",
    "DEFAULT_PORT",
    "DEFAULT_RUNTIME_PORT",
    "DeployError",
    "SuperLinkOptions",
    "SuperNodeOptions",
    "ensure_runtime_secret",
    "offline_env",
    "read_connection",
    "run_status",
    "submit_run",
    "superlink_command",
    "supernode_command",
    "wait_for_run",
    "write_connection",
]

logger = logging.getLogger(__name__)

COMPLETED = _sim.COMPLETED
DEFAULT_PORT = 9092  # SuperLink: Fleet, Control and Runtime APIs on one HTTPS port (Flower 1.42)
DEFAULT_RUNTIME_PORT = 9094  # SuperNode's local Runtime API (ClientApp processes talk to it)
DEFAULT_CONNECTION = "genseg"  # [superlink.genseg] in $FLWR_HOME/config.toml, for the flwr CLI
SUPEREXEC_POLL = "0.2"  # s; Flower's default is 1.0 (FLWR_SUPEREXEC_TASK_POLL_INTERVAL)
# Every weight tensor is its own object, fetched with its own HTTPS request; Flower fetches 2 at a time.
OBJECT_TRANSFERS = "8"
INSECURE_WARNING = (
    "INSECURE: TLS is off: weights, metrics and every command travel in clear text and anyone who can "
    "reach the port can join or submit runs. Use this only on a machine's loopback for debugging."
)
_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


class DeployError(RuntimeError):
    """A deployment step cannot be done as asked; the message says what to change."""


# ------------------------------------------------------------------------------------------------ env


def offline_env(flwr_home: Path) -> dict[str, str]:
    """Environment for a Flower process of a deployment: offline, this venv first on PATH.

    ``FLWR_TELEMETRY_ENABLED=0``, ``FLWR_DISABLE_UPDATE_CHECK=1`` and
    ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` (nothing is fetched from the network),
    ``FLWR_HOME`` set, SuperExec polls for new tasks every 0.2 s instead of 1 s, and message objects
    (one per weight tensor) are transferred 8 at a time instead of 2. A process marker
    (``GENSEG_SIM_MARKER``, used by tests to find every process at teardown) is passed on if set.
    """
    marker = os.environ.get(_sim.MARKER_ENV, "")
    env = _sim._flower_env(Path(flwr_home), marker)
    if not marker:
        env.pop(_sim.MARKER_ENV, None)
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", SUPEREXEC_POLL)
    for var in ("FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS", "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES"):
        env.setdefault(var, OBJECT_TRANSFERS)
    return env


def _exe(name: str) -> str:
    try:
        return _sim._executable(name)
    except _sim.SimulationError as exc:
        raise DeployError(str(exc)) from None


def _check_address(address: str) -> tuple[str, int]:
    match = _ADDRESS.match(address)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise DeployError(
            f"{address!r} is not HOST:PORT (e.g. 10.0.0.5:{DEFAULT_PORT} or fl.example.org:9092)"
        )
    return match.group(1).strip("[]"), int(match.group(2))


def _quoted(key: str, value: str) -> str:
    """``key="value"`` as Flower's ``--node-config`` parser reads it (a TOML string, no escapes needed)."""
    if any(c in value for c in '"\\\n'):
        raise DeployError(f'{key} {value!r} must not contain ", \\ or a line break')
    return f'{key}="{value}"'


# ------------------------------------------------------------------------------------------------ SuperLink


@dataclass(frozen=True)
class SuperLinkOptions:
    """How the coordinator's SuperLink is started (see ``genseg-fed superlink --help``)."""

    certs: Path | None  # folder with ca.crt, superlink.crt, superlink.key; None only with insecure
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    database: Path | None = None  # SQLite file: registrations and runs survive a restart
    supernode_auth: bool = True
    insecure: bool = False


def superlink_command(opts: SuperLinkOptions) -> list[str]:
    """``flower-superlink`` arguments for ``opts``, after checking the certificates fit the address."""
    if not 0 < opts.port < 65536:
        raise DeployError(f"port {opts.port} is not a TCP port")
    cmd = [_exe("flower-superlink"), "--host", opts.host, "--port", str(opts.port)]
    if opts.insecure:
        if opts.supernode_auth:
            raise DeployError(
                "SuperNode authentication needs TLS (Flower refuses it without): drop --insecure, "
                "or also pass --no-supernode-auth"
            )
        logger.warning("%s", INSECURE_WARNING)
        cmd.append("--insecure")
    else:
        if opts.certs is None:
            raise DeployError(
                "TLS needs --certs (a folder made by `genseg-fed certs init`), or pass --insecure"
            )
        files = SuperLinkCerts.in_dir(Path(opts.certs).expanduser().resolve())
        try:
            check_superlink_certs(files, hosts=[opts.host])
        except CertError as exc:
            raise DeployError(str(exc)) from None
        cmd += [
            "--ssl-ca-certfile",
            str(files.ca_cert),
            "--ssl-certfile",
            str(files.cert),
            "--ssl-keyfile",
            str(files.key),
        ]
        if opts.supernode_auth:
            cmd.append("--enable-supernode-auth")
        else:
            logger.warning("SuperNode authentication is off: any SuperNode that trusts the CA can join")
    if opts.database is not None:
        cmd += ["--database", str(Path(opts.database).expanduser().resolve())]
    cmd.append("--disable-runtime-dependency-installation")
    return cmd


def write_connection(flwr_home: Path, name: str, address: str, *, ca_cert: Path | None) -> Path:
    """Add or replace ``[superlink.<name>]`` in ``$FLWR_HOME/config.toml`` for the ``flwr`` CLI.

    ``ca_cert=None`` writes ``insecure = true``. Other connections are kept; the new one becomes the
    default only if there is none. A missing config.toml is created here, so Flower never creates its
    own, whose ``local`` default starts a detached SuperLink.
    """
    _check_address(address)
    flwr_home = Path(flwr_home).expanduser()
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    entry: dict[str, Any] = {"address": address}
    if ca_cert is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(Path(ca_cert).expanduser().resolve())
    with _sim._locked_dir(flwr_home):
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        except tomllib.TOMLDecodeError as exc:
            raise DeployError(f"{path} is not valid TOML ({exc}); fix or remove it") from exc
        links = data.setdefault("superlink", {})
        links.setdefault("default", name)
        links[name] = entry
        _sim._write_atomic(path, "# Flower CLI connections (updated by genseg-fed)\n" + tomli_w.dumps(data))
    return path


def read_connection(flwr_home: Path, name: str) -> dict[str, Any]:
    """``[superlink.<name>]`` of ``$FLWR_HOME/config.toml`` (a clear error if it is missing)."""
    path = Path(flwr_home).expanduser() / "config.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DeployError(f"cannot read {path}: {exc}") from None
    entry = data.get("superlink", {}).get(name)
    if not isinstance(entry, dict):
        raise DeployError(
            f"no connection [superlink.{name}] in {path}; `genseg-fed superlink` writes it on the coordinator, "
            "or copy that section from there"
        )
    return entry


# ------------------------------------------------------------------------------------------------ SuperNode


@dataclass(frozen=True)
class SuperNodeOptions:
    """How a hospital's SuperNode is started (see ``genseg-fed supernode --help``)."""

    superlink: str  # HOST:PORT of the SuperLink
    site_name: str
    state_dir: Path
    data_path: Path | None = None  # the site folder (images/ + masks/); None: the config's source
    orientation: str | None = None
    ca_cert: Path | None = None  # None only with insecure
    key: Path | None = None  # SuperNode authentication key; None only with no_auth
    port: int = DEFAULT_RUNTIME_PORT
    insecure: bool = False
    no_auth: bool = False
    warm: bool = True  # warm ClientApp runner (--isolation process) instead of one interpreter per message
    max_wait_time: float | None = None  # give up connecting after this many seconds (None: never)
    runtime_secret: Path | None = None  # warm only: only holders of this secret may take tasks


def node_config(opts: SuperNodeOptions) -> str:
    """The ``--node-config`` string: site name, data folder, state folder (see genseg_fed.fed.runconfig)."""
    parts = [_quoted("site-name", opts.site_name)]
    if opts.data_path is not None:
        parts.append(_quoted("data-path", str(Path(opts.data_path).expanduser().resolve())))
    if opts.orientation:
        parts.append(_quoted("orientation", opts.orientation))
    parts.append(_quoted("state-dir", str(Path(opts.state_dir).expanduser().resolve())))
    return " ".join(parts)


def ensure_runtime_secret(path: Path) -> Path:
    """A random 32-byte secret (mode 0600) shared by the SuperNode and its warm runner; kept if present."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    return path


def _check_site_folder(path: Path) -> None:
    path = Path(path).expanduser()
    missing = [sub for sub in ("images", "masks") if not (path / sub).is_dir()]
    if missing:
        raise DeployError(
            f"site folder {path} has no {' or '.join(f'{m}/' for m in missing)}; it needs images/ and masks/ "
            "(check it with `genseg-fed check-site`)"
        )


def supernode_command(opts: SuperNodeOptions) -> list[str]:
    """``flower-supernode`` arguments for ``opts`` after checking the CA file, key and site folder."""
    _check_address(opts.superlink)
    if not 0 < opts.port < 65536:
        raise DeployError(f"port {opts.port} is not a TCP port")
    if opts.data_path is not None:
        _check_site_folder(opts.data_path)
    cmd = [_exe("flower-supernode"), "--superlink", opts.superlink]
    if opts.insecure:
        logger.warning("%s", INSECURE_WARNING)
        if opts.key is not None:
            raise DeployError("SuperNode authentication needs TLS: drop --insecure or --key")
        cmd.append("--insecure")
    else:
        if opts.ca_cert is None:
            raise DeployError(
                "TLS needs --ca (the federation's ca.crt from the coordinator), or pass --insecure"
            )
        ca = Path(opts.ca_cert).expanduser().resolve()
        if not ca.is_file():
            raise DeployError(f"CA certificate {ca} does not exist")
        cmd += ["--root-certificates", str(ca)]
        if opts.key is None:
            if not opts.no_auth:
                raise DeployError(
                    "pass --key (this hospital's private key, made with `genseg-fed certs node NAME`), "
                    "or --no-auth if the SuperLink runs without SuperNode authentication"
                )
        else:
            try:
                check_node_key(opts.key)
            except CertError as exc:
                raise DeployError(str(exc)) from None
            cmd += ["--auth-supernode-private-key", str(Path(opts.key).expanduser().resolve())]
    cmd += ["--node-config", node_config(opts), "--port", str(opts.port)]
    if opts.warm:
        cmd += ["--isolation", "process"]
        if opts.runtime_secret is not None:
            cmd += ["--superexec-auth-secret-file", str(Path(opts.runtime_secret).resolve())]
    if opts.max_wait_time is not None:
        cmd += ["--max-wait-time", str(opts.max_wait_time)]
    return cmd


# ------------------------------------------------------------------------------------------------ runs


def _flwr_json(
    args: Sequence[str], *, env: Mapping[str, str], cwd: Path, timeout: float = 120.0
) -> dict[str, Any]:
    try:
        out = _sim._flwr(args, env=env, cwd=cwd, timeout=timeout)
        return _sim._json_from(out)
    except _sim.SimulationError as exc:
        raise DeployError(str(exc)) from None
    except ValueError as exc:
        raise DeployError(f"`flwr {' '.join(args)}` printed no JSON ({exc})") from None


def submit_run(
    *,
    app_dir: Path,
    connection: str,
    run_config: Mapping[str, Any],
    env: Mapping[str, str],
    workdir: Path,
) -> int:
    """Submit the app with ``flwr run --format json``; returns the run id (raises if the SuperLink refused)."""
    _sim.check_run_config(app_dir, run_config)
    workdir.mkdir(parents=True, exist_ok=True)
    config_file = _sim.write_run_config(run_config, workdir / f"run_config-{time.time_ns()}.toml")
    args = ["run", str(app_dir), connection, "--run-config", str(config_file), "--format", "json"]
    data = _flwr_json(args, env=env, cwd=workdir, timeout=300.0)
    if not data.get("success") or "run-id" not in data:
        raise DeployError(f"the SuperLink refused the run: {data.get('error-message', data)}")
    return int(data["run-id"])


def run_status(run_id: int, *, connection: str, env: Mapping[str, str], cwd: Path) -> dict[str, Any]:
    """The run's entry of ``flwr ls --run-id <id> --format json`` (status, status-details, elapsed...)."""
    try:
        return _sim._run_status(run_id, connection, env=env, cwd=cwd)
    except _sim.SimulationError as exc:
        raise DeployError(str(exc)) from None


def wait_for_run(
    run_id: int,
    *,
    connection: str,
    env: Mapping[str, str],
    cwd: Path,
    timeout: float | None = None,
    interval: float = 2.0,
) -> dict[str, Any]:
    """Poll the run's status until it is ``finished:*`` (or ``timeout`` s pass); returns the last entry."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        info = run_status(run_id, connection=connection, env=env, cwd=cwd)
        if str(info.get("status", "")).startswith("finished"):
            return info
        if deadline is not None and time.monotonic() > deadline:
            return info
        time.sleep(interval)


def flwr(
    args: Sequence[str], *, env: Mapping[str, str], cwd: Path, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run a ``flwr`` CLI command (e.g. ``supernode register``) and return the finished process."""
    try:
        return _sim._flwr_process(args, env=env, cwd=cwd, timeout=timeout)
    except _sim.SimulationError as exc:
        raise DeployError(str(exc)) from None
