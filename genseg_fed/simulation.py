"""Run the Flower app as a local simulation (the engine behind ``genseg-fed simulate``).

One call does a whole run on this machine, on loopback only:

1. writes a connection ``[superlink.genseg-sim-<port>]`` into ``$FLWR_HOME/config.toml`` (other sections
   and comments are kept; the section is removed again at the end),
2. starts a private ``flower-superlink --simulation`` on a free 127.0.0.1 port (one HTTP port serves the
   Control, Runtime and Fleet APIs in Flower 1.42) from a neutral working directory,
3. submits the app with ``flwr run --stream`` (virtual SuperNodes on Ray), drawing a tqdm bar from the
   ``progress.jsonl`` the ServerApp writes into ``out_dir`` (see :mod:`genseg_fed.progress`),
4. reads the run's final status with ``flwr ls --format json`` (``flwr run`` exits 0 even when the run
   failed) and raises :class:`SimulationError` unless it is ``finished:completed``,
5. always stops the SuperLink and everything it started (SuperExec, the simulation process, Ray), also
   on errors, Ctrl-C and SIGTERM. Every process of the run carries a marker in its environment, so
   processes that detached from the tree are found too.

Logs: ``out_dir/superlink.log`` and ``out_dir/flower.log`` (the streamed run log).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import tomli_w
from tqdm.auto import tqdm

from .progress import PROGRESS_FILE, LineTail, ProgressReader

__all__ = [
    "COMPLETED",
    "SimulationError",
    "SimulationResult",
    "check_app_dir",
    "check_run_config",
    "find_app_dir",
    "run_simulation",
    "write_run_config",
]

logger = logging.getLogger(__name__)
flower_logger = logging.getLogger(__name__ + ".flower")  # the streamed run log when progress=False

COMPLETED = "finished:completed"
LOOPBACK = "127.0.0.1"
CONNECTION_PREFIX = "genseg-sim-"
MARKER_ENV = "GENSEG_SIM_MARKER"  # set in every process of a run, to find them all at teardown

_RUN_ID = re.compile(r"Successfully started run (\d+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # Flower colours its log levels even in files
_PORT_IN_USE = re.compile(r"address already in use|Errno 98|Errno 48", re.IGNORECASE)

RunConfigValue = str | int | float | bool | os.PathLike  # what a run-config value may be


@dataclass(frozen=True)
class SimulationResult:
    """A finished simulation: Flower's run id and final status, where its log is, how long it took."""

    run_id: int
    status: str
    details: str
    log_path: Path
    seconds: float
    timings: Mapping[str, float] = field(default_factory=dict)  # superlink_start, run, status, teardown


class SimulationError(RuntimeError):
    """The simulation could not start, failed, or timed out; the message says why and quotes the log."""

    def __init__(
        self,
        message: str,
        *,
        run_id: int | None = None,
        status: str | None = None,
        details: str | None = None,
        log_path: Path | None = None,
    ) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.status = status
        self.details = details
        self.log_path = log_path


# ---------------------------------------------------------------------------------------------- app folder


def _flower_app_manifest(app_dir: Path) -> dict[str, Any]:
    """``[tool.flwr.app]`` of ``app_dir/pyproject.toml``; a clear error if it is not a Flower app."""
    pyproject = app_dir / "pyproject.toml"
    if not pyproject.is_file():
        raise SimulationError(f"{app_dir} is not a Flower app folder: it has no pyproject.toml")
    try:
        manifest = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SimulationError(f"cannot read {pyproject}: {exc}") from exc
    app = manifest.get("tool", {}).get("flwr", {}).get("app", {})
    missing = [key for key in ("serverapp", "clientapp") if key not in app.get("components", {})]
    if missing:
        raise SimulationError(
            f"{pyproject} does not declare a Flower app: [tool.flwr.app.components] needs {missing}"
        )
    return dict(app)


def check_app_dir(app_dir: Path) -> Path:
    """``app_dir`` resolved, if its ``pyproject.toml`` declares a Flower app; a clear error otherwise."""
    app_dir = Path(app_dir).expanduser().resolve()
    _flower_app_manifest(app_dir)
    return app_dir


def _flat_keys(table: Mapping[str, Any], prefix: str = "") -> set[str]:
    """Keys of a TOML table flattened the way Flower does (``[a] b = 1`` -> ``a.b``)."""
    keys = set()
    for key, value in table.items():
        name = f"{prefix}{key}"
        keys |= _flat_keys(value, f"{name}.") if isinstance(value, Mapping) else {name}
    return keys


def check_run_config(app_dir: Path, run_config: Mapping[str, Any]) -> None:
    """Every run-config key must exist in the app's ``[tool.flwr.app.config]`` (Flower refuses others)."""
    known = _flat_keys(_flower_app_manifest(Path(app_dir)).get("config", {}))
    unknown = sorted(set(map(str, run_config)) - known)
    if unknown:
        raise SimulationError(
            f"run config keys {unknown} are not in [tool.flwr.app.config] of {Path(app_dir) / 'pyproject.toml'}; "
            f"known keys: {sorted(known)}"
        )


def find_app_dir(package_dir: Path | None = None) -> Path:
    """The source checkout holding this package: the folder with ``pyproject.toml`` and ``[tool.flwr.app]``.

    ``package_dir`` (default: the installed ``genseg_fed`` folder) is for tests.
    """
    package_dir = Path(package_dir) if package_dir else Path(__file__).resolve().parent
    root = package_dir.parent
    try:
        return check_app_dir(root)
    except SimulationError as exc:
        raise SimulationError(
            f"simulate needs the source checkout (the folder with pyproject.toml, server/ and client/), "
            f"because Flower bundles the app from it; genseg_fed is imported from {package_dir}, and {exc}. "
            "Clone the repository and `pip install -e .` in it, or pass --app /path/to/checkout."
        ) from None


# --------------------------------------------------------------------------------------------- run config


def _toml_value(key: str, value: Any) -> str | int | float | bool:
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, os.PathLike):
        return str(Path(value).expanduser().resolve())
    raise TypeError(
        f"run config {key!r}: {type(value).__name__} is not a TOML scalar (str, int, float, bool, Path)"
    )


def write_run_config(run_config: Mapping[str, RunConfigValue], path: Path) -> Path:
    """Write run-config overrides as a flat TOML file for ``flwr run --run-config <file>``.

    A file avoids shell and TOML quoting problems (paths with spaces or quotes); ``Path`` values are made
    absolute, because Flower resolves relative paths against the SuperLink's working directory.
    """
    values = {str(key): _toml_value(str(key), value) for key, value in run_config.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(values), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------- $FLWR_HOME/config.toml


@contextlib.contextmanager
def _locked_dir(directory: Path) -> Iterator[None]:
    """Exclusive lock on ``directory`` (POSIX flock), so concurrent runs do not lose each other's edits."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _connection_block(name: str, address: str) -> str:
    return (
        f'\n[superlink.{name}]  # genseg-fed simulate (temporary)\naddress = "{address}"\ninsecure = true\n'
    )


_OUR_BLOCK = re.compile(
    r'\n\[superlink\.genseg-sim-(\d+)\]  # genseg-fed simulate \(temporary\)\naddress = "127\.0\.0\.1:\1"\n'
    r"insecure = true\n"
)


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((LOOPBACK, port)) == 0


def _drop_stale_blocks(text: str) -> str:
    """Remove our sections left by a run that was killed (SIGKILL) before it could clean up."""
    return _OUR_BLOCK.sub(lambda m: m.group(0) if _listening(int(m.group(1))) else "", text)


@contextlib.contextmanager
def _flower_connection(flwr_home: Path, name: str, address: str) -> Iterator[Path]:
    """Add ``[superlink.<name>]`` to ``$FLWR_HOME/config.toml`` for the duration of the block.

    The section is appended as text (comments and other sections stay as they are) and cut out again
    afterwards. A missing config.toml is created by us: otherwise the next ``flwr`` command would create
    Flower's default one, whose ``local`` connection starts a detached SuperLink.
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    block = _connection_block(name, address)
    with _locked_dir(flwr_home):
        text = (
            path.read_text(encoding="utf-8") if path.exists() else "# Flower CLI connections\n[superlink]\n"
        )
        text = _drop_stale_blocks(text)
        try:
            tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SimulationError(f"{path} is not valid TOML ({exc}); fix or remove it") from exc
        new = text if text.endswith("\n") else text + "\n"
        new += block
        try:
            ok = tomllib.loads(new).get("superlink", {}).get(name, {}).get("address") == address
        except tomllib.TOMLDecodeError:
            ok = False
        if not ok:  # unusual layout (e.g. dotted keys): merge as data instead (comments are lost then)
            data = tomllib.loads(text)
            data.setdefault("superlink", {})[name] = {"address": address, "insecure": True}
            new = tomli_w.dumps(data)
        _write_atomic(path, new)
    try:
        yield path
    finally:
        with _locked_dir(flwr_home):
            try:
                text = path.read_text(encoding="utf-8")
                if block in text:
                    _write_atomic(path, text.replace(block, "", 1))
                else:
                    data = tomllib.loads(text)
                    if data.get("superlink", {}).pop(name, None) is not None:
                        _write_atomic(path, tomli_w.dumps(data))
            except (OSError, tomllib.TOMLDecodeError) as exc:
                logger.warning("could not remove [superlink.%s] from %s: %s", name, path, exc)


# ------------------------------------------------------------------------------------------------ processes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _bin_dir() -> Path:
    """The directory of this interpreter's console scripts (the venv's ``bin``), unresolved on purpose."""
    return Path(sys.executable).parent


def _executable(name: str) -> str:
    path = _bin_dir() / name
    if path.exists():
        return str(path)
    raise SimulationError(
        f"{name} not found next to {sys.executable}; install genseg-fed (with flwr[simulation]) into "
        "this Python environment"
    )


def _flower_env(flwr_home: Path, marker: str) -> dict[str, str]:
    """Environment for every Flower process of a run: offline, loopback-only, marked, this venv first."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(_bin_dir()), env.get("PATH", "")])  # SuperLink finds SuperExec by name
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray listens on 127.0.0.1 only
    env["RAY_USAGE_STATS_ENABLED"] = "0"  # no usage reports (no network here)
    env.pop("FLWR_INTERNAL_GRPC_CONTROL_API", None)  # would open legacy gRPC ports on 0.0.0.0
    env.pop("FLWR_INTERNAL_GRPC_FLEET_API", None)
    for var in ("NO_PROXY", "no_proxy"):  # the CLI's HTTP client must not send loopback to a proxy
        hosts = [h for h in env.get(var, "").split(",") if h]
        env[var] = ",".join([*hosts, *(h for h in (LOOPBACK, "localhost") if h not in hosts)])
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = env.get("COLUMNS", "160")
    env[MARKER_ENV] = marker
    return env


def _child_setup() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes a child get SIGTERM if we die without cleaning up (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def setup() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))

    return setup


def _popen(cmd: Sequence[str], *, env: Mapping[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own session (Ctrl-C reaches only us), stdout and stderr appended to ``log``."""
    logger.debug("starting %s (cwd %s, log %s)", " ".join(cmd), cwd, log)
    with log.open("ab") as out:
        return subprocess.Popen(
            list(cmd),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_child_setup(),  # only prctl(): safe between fork and exec
        )


def _tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log, without colour codes."""
    try:
        text = _ANSI.sub("", path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return f"({path} could not be read)"
    return "\n".join(text.rstrip("\n").splitlines()[-lines:]) or f"({path} is empty)"


# Processes are identified as (pid, start time) so a recycled pid is never signalled.
Proc = tuple[int, int]


def _proc_stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, start time, state) of a Linux process, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return int(fields[1]), int(fields[19]), fields[0]


def _alive(proc: Proc) -> bool:
    stat = _proc_stat(proc[0])
    return stat is not None and stat[1] == proc[1] and stat[2] not in ("Z", "X")


def _run_processes(marker: str, roots: Sequence[int]) -> set[Proc]:
    """Live processes of a run: descendants of ``roots`` plus every process whose environment has the marker.

    Linux only (``/proc``); elsewhere this finds nothing and teardown relies on Flower's own parent-pid
    watchers after the SuperLink stops.
    """
    if not Path("/proc/self/stat").exists():  # pragma: no cover - not Linux
        return set()
    table: dict[int, tuple[int, int, str]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
            table[int(entry.name)] = stat
    wanted = f"{MARKER_ENV}={marker}".encode()
    found = {pid for pid in roots if pid in table}
    for pid in table:
        if pid != os.getpid():
            with contextlib.suppress(OSError):
                if wanted in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    found.add(pid)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return {(pid, table[pid][1]) for pid in found if table[pid][2] not in ("Z", "X")}


def _names(procs: set[Proc]) -> str:
    """``pid name`` of each process, for log messages."""
    names = []
    for pid, _ in sorted(procs):
        try:
            names.append(f"{pid} {Path(f'/proc/{pid}/comm').read_text().strip()}")
        except OSError:
            names.append(str(pid))
    return ", ".join(names)


def _signal_all(procs: set[Proc], sig: signal.Signals) -> None:
    for proc in procs:
        if _alive(proc):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(proc[0], sig)


def _wait_gone(
    procs: set[Proc], marker: str, own: Sequence[subprocess.Popen[bytes]], seconds: float
) -> set[Proc]:
    """Wait until no process of the run is left (late ones are found by marker); returns the survivors."""
    roots = [p.pid for p in own]
    deadline = time.monotonic() + seconds
    while True:
        for popen in own:
            popen.poll()  # reap our own children so they do not linger as zombies
        procs = {p for p in procs | _run_processes(marker, roots) if _alive(p)}
        if not procs or time.monotonic() >= deadline:
            return procs
        time.sleep(0.1)


def _stop_run_processes(
    superlink: subprocess.Popen[bytes] | None,
    runner: subprocess.Popen[bytes] | None,
    marker: str,
    *,
    grace: float,
) -> None:
    """Stop every process of the run: SIGTERM to the SuperLink, after ``grace`` s to all left, then SIGKILL.

    After a finished run only the SuperLink and SuperExec are left and stop within a second. A run cut
    short (timeout, Ctrl-C, error) keeps its simulation process waiting on the ServerApp, so it gets a
    short grace period before everyone gets SIGTERM.
    """
    own = [p for p in (superlink, runner) if p is not None]
    procs = _run_processes(marker, [p.pid for p in own])
    if runner is not None and runner.poll() is None:
        runner.terminate()
    if superlink is not None and superlink.poll() is None:
        # The SuperLink stops SuperExec; the simulation process follows and shuts Ray down.
        superlink.terminate()
    procs = _wait_gone(procs, marker, own, grace)
    if procs:
        logger.debug("SIGTERM to the remaining simulation processes: %s", _names(procs))
        _signal_all(procs, signal.SIGTERM)
        procs = _wait_gone(procs, marker, own, 2.0)  # Ray's RuntimeEnvAgent may ignore SIGTERM
    if procs:
        logger.warning("killing simulation processes that ignored SIGTERM: %s", _names(procs))
        _signal_all(procs, signal.SIGKILL)
        procs = _wait_gone(procs, marker, own, 3.0)
    for popen in own:
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=1.0)
    if procs:
        logger.error("simulation processes still running after SIGKILL: %s", _names(procs))


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """In the main thread, turn SIGTERM into SystemExit while the run lasts, so cleanup still happens."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _new_marker() -> str:
    """A fresh value for :data:`MARKER_ENV`, unique to one run."""
    return uuid.uuid4().hex


# ----------------------------------------------------------------------------------------------- SuperLink


def _healthy(port: int) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{LOOPBACK}:{port}/health", timeout=1.0) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError):
        return False


def _start_superlink(
    *, env: Mapping[str, str], cwd: Path, log: Path, deadline_s: float = 90.0, attempts: int = 3
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``flower-superlink --simulation`` on a free loopback port and wait until it answers /health."""
    exe = _executable("flower-superlink")
    for attempt in range(1, attempts + 1):
        port = _free_port()
        cmd = [
            exe,
            "--insecure",
            "--simulation",
            "--host",
            LOOPBACK,
            "--port",
            str(port),
            "--disable-runtime-dependency-installation",
        ]
        offset = log.stat().st_size if log.exists() else 0
        proc = _popen(cmd, env=env, cwd=cwd, log=log)
        deadline = time.monotonic() + deadline_s
        while proc.poll() is None and time.monotonic() < deadline:
            if _healthy(port):
                logger.info("Flower SuperLink ready on %s:%d (pid %d)", LOOPBACK, port, proc.pid)
                return proc, port
            time.sleep(0.1)
        with log.open("rb") as f:
            f.seek(offset)
            own_log = f.read().decode("utf-8", errors="replace")
        if proc.poll() is None:
            proc.terminate()  # the rest of its processes are stopped by run_simulation's teardown
            raise SimulationError(
                f"the Flower SuperLink did not answer on {LOOPBACK}:{port} within {deadline_s:.0f} s; "
                f"last lines of {log}:\n{_tail(log)}",
                log_path=log,
            ) from None
        if _PORT_IN_USE.search(own_log) and attempt < attempts:
            logger.info("port %d was taken meanwhile; trying another", port)
            continue
        raise SimulationError(
            f"the Flower SuperLink exited during start-up (exit code {proc.returncode}); "
            f"last lines of {log}:\n{_tail(log)}",
            log_path=log,
        )
    raise AssertionError("unreachable")  # pragma: no cover


# ---------------------------------------------------------------------------------------------- Flower CLI


def _json_from(text: str) -> dict[str, Any]:
    """The first JSON object in CLI output (rich may print warnings around it)."""
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON object in output")
    obj, _ = json.JSONDecoder().raw_decode(text[start:])
    if not isinstance(obj, dict):
        raise ValueError("JSON output is not an object")
    return obj


def _flwr_process(
    args: Sequence[str], *, env: Mapping[str, str], cwd: Path, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run a short ``flwr`` CLI command to completion (exit status not checked)."""
    try:
        return subprocess.run(
            [_executable("flwr"), *args],
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise SimulationError(f"`flwr {' '.join(args)}` did not answer within {timeout:.0f} s") from None


def _flwr(args: Sequence[str], *, env: Mapping[str, str], cwd: Path, timeout: float = 60.0) -> str:
    """Run a short ``flwr`` CLI command and return its stdout (stderr is logged at debug level)."""
    done = _flwr_process(args, env=env, cwd=cwd, timeout=timeout)
    if done.stderr.strip():
        logger.debug("%s stderr: %s", " ".join(args), done.stderr.strip())
    return done.stdout


def _run_status(run_id: int | None, connection: str, *, env: Mapping[str, str], cwd: Path) -> dict[str, Any]:
    """The run's entry of ``flwr ls --format json`` (the only run on our private SuperLink if id is None)."""
    args = ["ls", connection, "--format", "json"] + (["--run-id", str(run_id)] if run_id is not None else [])
    out = _flwr(args, env=env, cwd=cwd)
    try:
        data = _json_from(out)
    except ValueError as exc:
        raise SimulationError(
            f"could not read `flwr {' '.join(args)}` output ({exc}): {out[-2000:]}"
        ) from None
    runs = data.get("runs") or []
    if not data.get("success", False) or not runs:
        raise SimulationError(f"`flwr {' '.join(args)}` found no run: {data.get('error-message', data)}")
    return dict(runs[-1])


class _ProgressDisplay:
    """Follows ``progress.jsonl`` (tqdm bar) or, without a bar, forwards the run log to logging."""

    def __init__(self, out_dir: Path, flower_log: Path, *, progress: bool) -> None:
        self.progress = progress
        self.events = ProgressReader(out_dir / PROGRESS_FILE)
        self.lines = LineTail(flower_log)
        self.bar: tqdm | None = None
        self.closed = False
        self.live = progress and sys.stderr.isatty()  # redraw on a terminal only, not into CI logs
        self.refreshed = time.monotonic()
        if progress:
            self.bar = tqdm(desc="federated run", unit="step", dynamic_ncols=True)
            self.bar.set_postfix_str("starting the simulation", refresh=True)

    def poll(self) -> None:
        if not self.progress:
            for line in self.lines.read():
                flower_logger.info("%s", _ANSI.sub("", line))
            return
        assert self.bar is not None
        for event in self.events.read():
            kind = event["event"]
            if kind == "start":
                self.bar.reset(total=int(event.get("total") or 0) or None)
                self.bar.n = int(event.get("done") or 0)  # steps finished before a resume
                if event.get("desc"):
                    self.bar.set_description_str(str(event["desc"]), refresh=False)
                self.bar.set_postfix_str("", refresh=True)
            elif kind == "step":
                if event.get("desc"):
                    self.bar.set_postfix_str(str(event["desc"]), refresh=False)
                self.bar.update(int(event.get("n", 1)))
            elif kind == "done":
                if self.bar.total is not None and self.bar.n < self.bar.total:
                    self.bar.update(self.bar.total - self.bar.n)
                self.bar.set_postfix_str("done", refresh=True)
        if self.live and time.monotonic() - self.refreshed > 1.0:
            self.bar.refresh()  # keeps the elapsed time moving while Ray starts
            self.refreshed = time.monotonic()

    def close(self) -> None:
        if self.closed:
            return
        self.poll()
        self.closed = True
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------------ the run


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.perf_counter() > deadline


def _check_superlink(superlink: subprocess.Popen[bytes], superlink_log: Path, flower_log: Path) -> None:
    """Raise if the SuperLink died (then nothing can finish the run)."""
    if superlink.poll() is not None:
        raise SimulationError(
            f"the Flower SuperLink stopped during the run (exit code {superlink.returncode}); last lines of "
            f"{superlink_log}:\n{_tail(superlink_log)}\n\nlast lines of {flower_log}:\n{_tail(flower_log)}",
            log_path=flower_log,
        )


def _default_flwr_home(out_dir: Path) -> Path:
    env_home = os.environ.get("FLWR_HOME")
    return Path(env_home).expanduser() if env_home else out_dir / ".flwr"


def _warn_if_bundled(out_dir: Path, app_dir: Path) -> None:
    """Flower bundles *.json/*.yaml/*.py... under the app folder unless its .gitignore excludes them."""
    try:
        rel = out_dir.relative_to(app_dir)
    except ValueError:
        return
    top = rel.parts[0] if rel.parts else ""
    ignore = app_dir / ".gitignore"
    ignored = ignore.exists() and any(
        line.strip().strip("/") == top for line in ignore.read_text(encoding="utf-8").splitlines()
    )
    if not ignored:
        logger.warning(
            "output folder %s is inside the app folder and not in its .gitignore: Flower will bundle its "
            "json/yaml/toml files into the next run's app bundle (10 MiB limit); prefer runs/...",
            out_dir,
        )


def run_simulation(
    *,
    app_dir: Path,
    out_dir: Path,
    num_supernodes: int,
    run_config: Mapping[str, RunConfigValue],
    flwr_home: Path | None = None,
    progress: bool = True,
    timeout: float | None = None,
    cpus_per_client: int = 2,
) -> SimulationResult:
    """Run the Flower app in ``app_dir`` as a simulation with ``num_supernodes`` virtual SuperNodes.

    ``run_config`` overrides keys of ``[tool.flwr.app.config]`` (each key must exist there; ``Path`` values
    are made absolute). ``flwr_home`` defaults to ``$FLWR_HOME``, else ``out_dir/.flwr``. ``timeout`` (s)
    limits the run itself, not SuperLink start-up. ``cpus_per_client`` is Ray's ``num_cpus`` per ClientApp
    (actors in parallel = machine CPUs // this; each actor gets as many torch threads).
    ``progress=True`` draws a bar from ``out_dir/progress.jsonl``; ``False`` forwards the run log to the
    ``genseg_fed.simulation.flower`` logger instead. Raises :class:`SimulationError` unless the run ends
    ``finished:completed``; never leaves a Flower or Ray process behind.
    """
    if num_supernodes < 1:
        raise ValueError(f"num_supernodes must be >= 1, got {num_supernodes}")
    if int(cpus_per_client) != cpus_per_client or cpus_per_client < 1:
        raise ValueError(
            f"cpus_per_client must be a whole number >= 1 (Flower rejects fractions), got {cpus_per_client}"
        )
    started = time.perf_counter()
    app_dir = check_app_dir(app_dir)
    check_run_config(app_dir, run_config)
    out_dir = Path(out_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    _warn_if_bundled(out_dir, app_dir)
    flwr_home = (Path(flwr_home).expanduser() if flwr_home else _default_flwr_home(out_dir)).resolve()
    workdir = out_dir / ".superlink"  # neutral cwd: it lands first on the ClientApps' sys.path
    workdir.mkdir(exist_ok=True)
    superlink_log, flower_log = out_dir / "superlink.log", out_dir / "flower.log"
    for log in (superlink_log, flower_log):
        log.write_bytes(b"")
    (out_dir / PROGRESS_FILE).unlink(missing_ok=True)  # the ServerApp appends this run's events afresh
    config_file = write_run_config(run_config, out_dir / "run_config.toml") if run_config else None

    marker = _new_marker()
    env = _flower_env(flwr_home, marker)
    timings: dict[str, float] = {}
    superlink: subprocess.Popen[bytes] | None = None
    runner: subprocess.Popen[bytes] | None = None
    finished = False  # the run reached a final status: teardown can be gentle
    with _sigterm_as_exit(), contextlib.ExitStack() as stack:
        try:
            flwr_home.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            superlink, port = _start_superlink(env=env, cwd=workdir, log=superlink_log)
            timings["superlink_start"] = time.perf_counter() - t0
            connection = f"{CONNECTION_PREFIX}{port}"
            stack.enter_context(_flower_connection(flwr_home, connection, f"{LOOPBACK}:{port}"))

            cmd = [_executable("flwr"), "run", str(app_dir), connection, "--stream"]
            cmd += [
                "--federation-config",
                f"num-supernodes={num_supernodes} client-resources-num-cpus={int(cpus_per_client)}",
            ]
            if config_file is not None:
                cmd += ["--run-config", str(config_file)]
            logger.info(
                "simulation of %s with %d SuperNodes; log: %s", app_dir.name, num_supernodes, flower_log
            )
            display = _ProgressDisplay(out_dir, flower_log, progress=progress)
            stack.callback(display.close)
            t0 = time.perf_counter()
            deadline = None if timeout is None else t0 + timeout
            runner = _popen(cmd, env=env, cwd=workdir, log=flower_log)
            while runner.poll() is None and superlink.poll() is None and not _past(deadline):
                display.poll()
                time.sleep(0.2)
            display.poll()
            timings["run"] = time.perf_counter() - t0
            _check_superlink(superlink, superlink_log, flower_log)
            match = _RUN_ID.search(flower_log.read_text(encoding="utf-8", errors="replace"))
            run_id = int(match.group(1)) if match else None
            if run_id is None:
                what = (
                    f"timed out after {timeout:.0f} s" if runner.poll() is None else "could not start the run"
                )
                raise SimulationError(
                    f"`flwr run` {what} (exit code {runner.poll()}); last lines of {flower_log}:\n"
                    f"{_tail(flower_log)}",
                    log_path=flower_log,
                )

            # `flwr run` exits 0 even when the run failed; the SuperLink knows how it ended.
            t0 = time.perf_counter()
            info = _run_status(run_id, connection, env=env, cwd=workdir)
            while not str(info.get("status", "")).startswith("finished") and not _past(deadline):
                display.poll()  # the log stream ended early: keep following the run until it ends
                _check_superlink(superlink, superlink_log, flower_log)
                time.sleep(1.0)
                info = _run_status(run_id, connection, env=env, cwd=workdir)
            display.close()
            timings["status"] = time.perf_counter() - t0
            status = str(info.get("status", "unknown"))
            details = str(info.get("status-details", ""))
            finished = status.startswith("finished")
            if status != COMPLETED:
                reason = status if finished else f"timed out after {timeout:.0f} s (status {status})"
                raise SimulationError(
                    f"Flower run {run_id} {reason}: {details}\nlast lines of {flower_log}:\n{_tail(flower_log)}",
                    run_id=run_id,
                    status=status,
                    details=details,
                    log_path=flower_log,
                )
        finally:
            t0 = time.perf_counter()
            _stop_run_processes(superlink, runner, marker, grace=3.0 if finished else 1.0)
            timings["teardown"] = time.perf_counter() - t0
            logger.debug("simulation timings: %s", {k: round(v, 2) for k, v in timings.items()})

    seconds = time.perf_counter() - started
    logger.info("Flower run %d %s in %.1f s", run_id, status, seconds)
    return SimulationResult(run_id, status, details, flower_log, seconds, timings)
