"""A warm ClientApp runner for ``flower-supernode --isolation process``.

By default a SuperNode's SuperExec starts a fresh ``flwr-clientapp`` interpreter for every message
(query, train, evaluate). Each one imports torch, MONAI and Flower again: several seconds per message,
two or more messages per round, on every site. Flower 1.42 has no long-lived ClientApp process for
deployments (its warm executor pools are for Kubernetes AgentApps only), but with ``--isolation process``
any process may take the SuperNode's tasks from its local Runtime API.

This runner does what SuperExec does (poll ``AcquireTask``, hand the task token to a ClientApp process),
except that the heavy third-party modules are imported **once**, in this long-lived process, and each
task runs in a ``fork()`` of it that calls Flower's own ``run_clientapp``. Flower semantics are kept:

* one process per message, as before (a crash or leak in one message cannot affect the next);
* the app code comes from the run's app bundle (FAB), as before: the app's own packages
  (``genseg_fed``, ``client``, ``server``) are dropped from the forked child's module cache before the
  ClientApp is loaded, so it imports them from the unpacked FAB, not from the installed copy;
* ``context.state``, error replies and task status go through the same Runtime API calls.

Only third-party modules are preloaded (torch, numpy, MONAI, ...), and nothing runs a torch operation
before the fork, so no OpenMP/intra-op thread pool exists to be broken by it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import FrameType, ModuleType

__all__ = ["APP_PACKAGES", "DEFAULT_PRELOAD", "preload", "run_runner"]

logger = logging.getLogger("genseg_fed.deploy.runner")  # also when run as __main__

# Imported once in the runner; what every genseg-fed ClientApp message spends its start-up on.
DEFAULT_PRELOAD = (
    "numpy",
    "torch",
    "torch.nn.functional",
    "torch.func",
    "scipy.ndimage",
    "monai",
    "monai.networks.nets",
    "monai.losses",
    "monai.transforms",
    "PIL.Image",
    "yaml",
    "nibabel",
    "matplotlib",
    "opacus",
    "flwr.app",
    "flwr.clientapp",
    "flwr.supernode.runtime.run_clientapp",
)
# Packages that come with the app bundle and must be imported from it in every task.
APP_PACKAGES = ("genseg_fed", "client", "server")
_IDLE_LOG_SECONDS = 300.0
PULL_INITIAL_BACKOFF = 0.05  # s (Flower: 1 s)
PULL_BACKOFF_CAP = 0.5  # s (Flower: 10 s)
STOP_GRACE = 5.0  # s between a stop request and a hard exit


def preload(modules: Iterable[str]) -> dict[str, float]:
    """Import ``modules`` (seconds each); a module that fails to import is logged and skipped."""
    seconds = {}
    for name in modules:
        started = time.perf_counter()
        try:
            importlib.import_module(name)
        except Exception as exc:  # an optional speed-up must never stop the runner
            logger.warning("preload of %s failed (%s); tasks will import it themselves", name, exc)
            continue
        seconds[name] = time.perf_counter() - started
    return seconds


def _purge_app_modules(packages: Sequence[str]) -> None:
    for name in list(sys.modules):
        if any(name == p or name.startswith(p + ".") for p in packages):
            del sys.modules[name]


def _fast_object_pulls(module: ModuleType) -> None:
    """Retry a not-yet-available message object after 0.05 s (doubling to 0.5 s), not after 1, 2, 4 s.

    The SuperNode hands out a task while it is still downloading the message's objects (the weights)
    from the SuperLink. A cold ``flwr-clientapp`` spends that time importing torch; a warm one would
    otherwise sleep Flower's 1 s initial back-off for nothing.
    """
    original = module.pull_and_inflate_object_from_tree
    module.pull_and_inflate_object_from_tree = functools.partial(
        original, initial_backoff=PULL_INITIAL_BACKOFF, backoff_cap=PULL_BACKOFF_CAP
    )


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    return exc.code if isinstance(exc.code, int) else 1


def _run_task_in_child(
    *,
    runtime_api_address: str,
    token: str,
    insecure: bool,
    certificates: bytes | None,
    packages: Sequence[str],
) -> None:
    """In the forked child: run one ClientApp task with Flower's own code, then leave with ``os._exit``."""
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        _purge_app_modules(packages)
        from flwr.supernode.runtime import run_clientapp as module

        _fast_object_pulls(module)
        module.run_clientapp(
            runtime_api_address=runtime_api_address,
            token=token,
            insecure=insecure,
            certificates=certificates,
            parent_pid=os.getppid(),  # the task stops when the runner goes away
            runtime_dependency_install=False,
        )
        code = 0
    except SystemExit as exc:  # flwr_exit() ends every task with sys.exit
        code = _exit_code(exc)
    except BaseException:  # report, then leave without the parent's cleanup
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


class _Stop:
    """SIGTERM / SIGINT / parent gone -> leave the polling loop; hard exit if that takes too long."""

    def __init__(self, parent_pid: int | None, children: dict[int, float]) -> None:
        self.event = threading.Event()
        self.children = children
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)
        if parent_pid is not None:
            threading.Thread(target=self._watch, args=(parent_pid,), daemon=True).start()

    def set(self) -> None:
        if not self.event.is_set():
            self.event.set()
            threading.Thread(target=self._deadline, daemon=True).start()

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.set()

    def _watch(self, pid: int) -> None:
        while not self.event.is_set():
            if os.getppid() != pid:  # reparented: the SuperNode that started us is gone
                logger.info("parent process %d is gone; stopping", pid)
                self.set()
            time.sleep(0.5)

    def _deadline(self) -> None:
        """The loop may be stuck in an HTTP call to a SuperNode that is gone: do not outlive it."""
        time.sleep(STOP_GRACE)
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os._exit(0)


def run_runner(
    runtime_api_address: str,
    *,
    insecure: bool = True,
    root_certificates: Path | None = None,
    poll_interval: float = 0.1,
    preload_modules: Iterable[str] = DEFAULT_PRELOAD,
    app_packages: Sequence[str] = APP_PACKAGES,
    parent_pid: int | None = None,
    auth_secret_file: Path | None = None,
) -> int:
    """Take ClientApp tasks from the SuperNode at ``runtime_api_address`` until stopped; returns 0.

    ``insecure``/``root_certificates``: how to reach the SuperNode's Runtime API (plain HTTP on
    127.0.0.1 unless the SuperNode was given ``--ssl-*`` files). ``poll_interval``: seconds between
    ``AcquireTask`` calls (a local HTTP request). ``parent_pid``: stop when that process is gone.
    ``auth_secret_file``: the SuperNode's ``--superexec-auth-secret-file``; ``AcquireTask`` is then
    signed with it, so no other local process can take this hospital's tasks.
    """
    if not 0.01 <= poll_interval <= 60:
        raise ValueError(f"poll_interval must be between 0.01 and 60 s, got {poll_interval}")
    certificates = Path(root_certificates).read_bytes() if root_certificates else None
    children: dict[int, float] = {}
    stop = _Stop(parent_pid, children)
    started = time.perf_counter()
    seconds = preload(preload_modules)
    logger.info(
        "warm ClientApp runner: preloaded %d modules in %.1f s; taking tasks from %s",
        len(seconds),
        time.perf_counter() - started,
        runtime_api_address,
    )
    _purge_app_modules(app_packages)  # none of ours may leak into the children

    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    retry = make_simple_http_retry_invoker()
    retry.max_time = 5.0  # our loop retries; a stop request must not wait behind Flower's back-off
    interceptors: list = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if auth_secret_file is not None:
        interceptors.append(
            SuperExecAuthHttpInterceptor(
                master_secret=Path(auth_secret_file).read_bytes(),
                protected_methods={"/flwr.proto.Runtime/AcquireTask"},
            )
        )
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=insecure,
        root_certificates=certificates,
        interceptors=interceptors,
        retry_invoker=retry,
    )
    last_activity = time.monotonic()
    try:
        while not stop.event.is_set():
            for pid in list(children):
                with contextlib.suppress(ChildProcessError):
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        took = time.perf_counter() - children.pop(pid)
                        logger.info("task process %d ended (status %d) after %.1f s", pid, status, took)
            try:
                res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            except Exception as exc:  # the SuperNode may be (re)starting
                logger.debug("AcquireTask failed: %s", exc)
                stop.event.wait(1.0)
                continue
            if res.HasField("task") and res.token:
                last_activity = time.monotonic()
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    _run_task_in_child(
                        runtime_api_address=runtime_api_address,
                        token=res.token,
                        insecure=insecure,
                        certificates=certificates,
                        packages=app_packages,
                    )
                children[pid] = time.perf_counter()
                logger.info("task %d (run %d) -> process %d", res.task.task_id, res.task.run_id, pid)
                continue  # there may be another task waiting
            if time.monotonic() - last_activity > _IDLE_LOG_SECONDS:
                logger.debug("no task for %.0f s", time.monotonic() - last_activity)
                last_activity = time.monotonic()
            stop.event.wait(poll_interval)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        client.close()
    logger.info("warm ClientApp runner stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m genseg_fed.deploy.runner --runtime-api-address 127.0.0.1:9094``."""
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runtime-api-address", default="127.0.0.1:9094")
    p.add_argument(
        "--root-certificates", type=Path, help="CA of the SuperNode's Runtime API (if it uses TLS)"
    )
    p.add_argument("--poll-interval", type=float, default=0.1)
    p.add_argument("--parent-pid", type=int)
    p.add_argument("--superexec-auth-secret-file", type=Path, help="the SuperNode's shared secret file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("flwr").propagate = False  # Flower prints its own records (once)
    if not os.environ.get("GENSEG_RUNNER_TRACE"):
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    return run_runner(
        args.runtime_api_address,
        insecure=args.root_certificates is None,
        root_certificates=args.root_certificates,
        poll_interval=args.poll_interval,
        parent_pid=args.parent_pid,
        auth_secret_file=args.superexec_auth_secret_file,
    )


if __name__ == "__main__":
    sys.exit(main())
