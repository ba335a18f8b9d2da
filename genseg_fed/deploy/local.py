"""A whole TLS federation on this machine's loopback, for the integration tests and the benchmark.

Every process is started through the same commands a coordinator and the hospitals run
(``genseg-fed certs``, ``superlink``, ``supernode``, ``flwr supernode register``), on free 127.0.0.1
ports, each role with its own folders (certificates, Flower home, on-site state, log). Each role's
processes carry their own marker in the environment, so one role can be killed on purpose (a crashed
hospital, a crashed coordinator) and :meth:`LocalFederation.close` finds and stops everything, also
processes that detached (Flower's SuperExec does), even when a test fails.

Layout under ``root``::

    certs/        ca.crt ca.key superlink.crt superlink.key   (genseg-fed certs init)
    keys/         <site>.key <site>.pub                      (genseg-fed certs node)
    coordinator/  state (SQLite database), flwr-home (config.toml, unpacked app bundles)
    sites/<site>/ state (on-site training state), flwr-home
    logs/         superlink.log, <site>.log
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import simulation as _sim
from .certs import NodeKeyPair, SuperLinkCerts, create_node_keys, create_superlink_certs
from .launch import DEFAULT_CONNECTION, DeployError, flwr, offline_env, run_status, submit_run, wait_for_run

__all__ = ["LocalFederation", "Role"]

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


@dataclass
class Role:
    """The processes of one party (the coordinator or one hospital)."""

    name: str
    marker: str
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def processes(self) -> set[_sim.Proc]:
        return _sim._run_processes(self.marker, [self.popen.pid] if self.popen else [])


class LocalFederation:
    """SuperLink + SuperNodes on loopback (see module docstring). Use as a context manager."""

    def __init__(
        self,
        root: Path,
        *,
        app_dir: Path | None = None,
        warm: bool = True,
        poll_interval: float = 0.5,
        connection: str = DEFAULT_CONNECTION,
        env: Mapping[str, str] | None = None,
        database: bool = True,
    ) -> None:
        self.root = Path(root).resolve()
        self.app_dir = Path(app_dir).resolve() if app_dir else _sim.find_app_dir()
        self.warm = warm
        self.poll_interval = poll_interval
        self.connection = connection
        self.database = database  # False: the SuperLink keeps its state in memory (lost on restart)
        self.extra_env = dict(env or {})  # for every process, e.g. Flower's own defaults for a benchmark
        self.certs = SuperLinkCerts.in_dir(self.root / "certs")
        self.keys_dir = self.root / "keys"
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.coordinator = Role("coordinator", _sim._new_marker(), self.logs / "superlink.log")
        self.sites: dict[str, Role] = {}
        self.port = 0
        self.flwr_home = self.root / "coordinator" / "flwr-home"

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process of every role (SIGTERM, then SIGKILL); never raises."""
        roles = [*self.sites.values(), self.coordinator]
        for role in roles:
            with contextlib.suppress(Exception):
                self._stop(role, sig=signal.SIGTERM)
        for role in roles:
            with contextlib.suppress(Exception):
                _sim._stop_run_processes(None, None, role.marker, grace=3.0)

    def _stop(self, role: Role, *, sig: signal.Signals) -> None:
        procs = role.processes()
        _sim._signal_all(procs, sig)
        own = [role.popen] if role.popen else []
        left = _sim._wait_gone(procs, role.marker, own, 5.0 if sig == signal.SIGTERM else 3.0)
        if left:
            _sim._signal_all(left, signal.SIGKILL)
            _sim._wait_gone(left, role.marker, own, 3.0)
        if role.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                role.popen.wait(timeout=2.0)

    # ------------------------------------------------------------------ processes
    def _env(self, marker: str) -> dict[str, str]:
        env = {**os.environ, **self.extra_env}
        env[_sim.MARKER_ENV] = marker
        env.pop("FLWR_HOME", None)  # every role passes its own --flwr-home
        return env

    def _start(self, role: Role, args: Sequence[str], *, cwd: Path) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "genseg_fed.cli", *args]
        with role.log.open("ab") as out:
            out.write(f"\n==== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n".encode())
        role.popen = _sim._popen(cmd, env=self._env(role.marker), cwd=cwd, log=role.log)
        return role.popen

    def make_certs(self, sites: Sequence[str], *, sans: Sequence[str] = ()) -> None:
        """CA, SuperLink certificate and one key pair per site (as `genseg-fed certs` would)."""
        if not self.certs.cert.exists():
            create_superlink_certs(self.certs.cert.parent, sans=sans)
        missing = [s for s in sites if not NodeKeyPair.in_dir(self.keys_dir, s).private_key.exists()]
        if missing:
            create_node_keys(self.keys_dir, missing)

    def key(self, site: str) -> NodeKeyPair:
        return NodeKeyPair.in_dir(self.keys_dir, site)

    def start_superlink(self, *, port: int | None = None, timeout: float = 90.0) -> None:
        """``genseg-fed superlink`` with TLS + SuperNode auth on a free loopback port; waits for /health."""
        self.port = port or self.port or _sim._free_port()
        state = self.root / "coordinator" / "state"
        state.mkdir(parents=True, exist_ok=True)
        args = [
            "superlink",
            "--certs",
            str(self.certs.cert.parent),
            "--host",
            LOOPBACK,
            "--port",
            str(self.port),
            "--state-dir",
            str(state),
            "--flwr-home",
            str(self.flwr_home),
            "--connection",
            self.connection,
            *([] if self.database else ["--no-database"]),
        ]
        proc = self._start(self.coordinator, args, cwd=self.root)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise DeployError(
                    f"the SuperLink exited ({proc.returncode}):\n{_sim._tail(self.coordinator.log)}"
                )
            if self.healthy():
                return
            time.sleep(0.2)
        raise DeployError(
            f"the SuperLink did not answer within {timeout:.0f} s:\n{_sim._tail(self.coordinator.log)}"
        )

    def healthy(self) -> bool:
        """The SuperLink answers ``/health`` over TLS, with a certificate our CA signed for 127.0.0.1."""
        context = ssl.create_default_context(cafile=str(self.certs.ca_cert))
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        try:
            with opener.open(f"https://{LOOPBACK}:{self.port}/health", timeout=2.0) as response:
                return 200 <= response.status < 300
        except (urllib.error.URLError, OSError):
            return False

    def kill_coordinator(self) -> None:
        """SIGKILL the SuperLink, its SuperExec and the ServerApp at once (a crashed coordinator machine)."""
        self._stop(self.coordinator, sig=signal.SIGKILL)
        self.coordinator.popen = None

    # ------------------------------------------------------------------ hospitals
    def flwr_env(self) -> dict[str, str]:
        """Environment for the coordinator's ``flwr`` CLI calls."""
        return offline_env(self.flwr_home) | self.extra_env | {_sim.MARKER_ENV: self.coordinator.marker}

    def register(self, site: str, public_key: Path | None = None) -> int:
        """``flwr supernode register <site>.pub`` at the coordinator; returns the node id."""
        pub = public_key or self.key(site).public_key
        done = flwr(
            ["supernode", "register", str(pub), self.connection, "--name", site, "--format", "json"],
            env=self.flwr_env(),
            cwd=self.root,
        )
        try:
            data = _sim._json_from(done.stdout)
        except ValueError:
            data = {}
        if not data.get("success"):
            raise DeployError(f"registering {site} failed: {done.stdout[-800:]} {done.stderr[-800:]}")
        return int(data["node-id"])

    def nodes(self) -> dict[int, str]:
        """``flwr supernode ls``: node id -> status (registered, online, offline, unregistered)."""
        done = flwr(
            ["supernode", "ls", self.connection, "--format", "json"], env=self.flwr_env(), cwd=self.root
        )
        data = _sim._json_from(done.stdout)
        return {int(n["node-id"]): str(n["status"]) for n in data.get("nodes", [])}

    def start_supernode(
        self,
        site: str,
        data: Path | None,
        *,
        key: Path | None = None,
        ca: Path | None = None,
        extra: Sequence[str] = (),
        warm: bool | None = None,
    ) -> subprocess.Popen[bytes]:
        """``genseg-fed supernode`` for ``site`` (its own key, state folder, Flower home and log)."""
        role = self.sites.get(site)
        if role is None:
            role = self.sites[site] = Role(site, _sim._new_marker(), self.logs / f"{site}.log")
        if role.popen is not None and role.popen.poll() is None:
            raise DeployError(f"the SuperNode of {site} is already running")
        base = self.root / "sites" / site
        port = role.extra.setdefault("port", _sim._free_port())
        args = [
            "supernode",
            "--superlink",
            f"{LOOPBACK}:{self.port}",
            "--ca",
            str(ca or self.certs.ca_cert),
            "--key",
            str(key or self.key(site).private_key),
            "--site-name",
            site,
            "--state-dir",
            str(base / "state"),
            "--flwr-home",
            str(base / "flwr-home"),
            "--port",
            str(port),
            *(["--data", str(data)] if data is not None else []),
            *([] if (self.warm if warm is None else warm) else ["--plain"]),
            "--poll-interval",
            str(self.poll_interval),
            *extra,
        ]
        base.mkdir(parents=True, exist_ok=True)
        return self._start(role, args, cwd=base)

    def kill_supernode(self, site: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Kill a hospital's SuperNode and everything it started (a crashed or unplugged site)."""
        self._stop(self.sites[site], sig=sig)

    def wait_online(self, count: int, timeout: float = 120.0) -> dict[int, str]:
        deadline = time.monotonic() + timeout
        while True:
            nodes = self.nodes()
            if sum(s == "online" for s in nodes.values()) >= count or time.monotonic() > deadline:
                return nodes
            time.sleep(0.5)

    # ------------------------------------------------------------------ runs
    def submit(self, run_config: Mapping[str, Any]) -> int:
        return submit_run(
            app_dir=self.app_dir,
            connection=self.connection,
            run_config=run_config,
            env=self.flwr_env(),
            workdir=self.root / "coordinator" / "submissions",
        )

    def status(self, run_id: int) -> dict[str, Any]:
        return run_status(run_id, connection=self.connection, env=self.flwr_env(), cwd=self.root)

    def wait(self, run_id: int, timeout: float) -> dict[str, Any]:
        return wait_for_run(
            run_id,
            connection=self.connection,
            env=self.flwr_env(),
            cwd=self.root,
            timeout=timeout,
            interval=1.0,
        )

    def log_text(self, role: str = "coordinator") -> str:
        log = self.coordinator.log if role == "coordinator" else self.sites[role].log
        return _sim._ANSI.sub("", log.read_text(encoding="utf-8", errors="replace")) if log.exists() else ""


def read_metrics(out_dir: Path) -> dict[str, Any]:
    """The coordinator's ``metrics.json`` (empty dict while it does not exist)."""
    path = Path(out_dir) / "metrics.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
