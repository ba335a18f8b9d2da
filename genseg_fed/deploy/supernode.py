"""A hospital's SuperNode with lower per-message latency: ``python -m genseg_fed.deploy.supernode``.

This is Flower's own ``flower-supernode`` (same arguments after ``--``, same code) with two changes:

* **idle polling**: an idle SuperNode asks the SuperLink for new messages every 3 s in Flower 1.42
  (a fixed ``time.sleep(3)`` in ``flwr.supernode.start_client_internal``); every message then waits
  1.5 s on average before the site even sees it. ``--poll-interval`` shortens that wait (each poll is
  one small HTTPS request to the SuperLink).
* **warm ClientApp runner**: with ``--warm`` it starts :mod:`genseg_fed.deploy.runner` next to the
  SuperNode, which must then run with ``--isolation process`` (``genseg-fed supernode`` arranges both).
* **restart after a crash**: with ``--node-id-file`` the node id is remembered, and at start-up a
  session of that node still open at the SuperLink (a crashed or killed previous instance: the
  SuperLink keeps it "online" until two 30 s heartbeats are missed, and refuses to activate the node
  again meanwhile) is closed first, with this node's own signed request. The restarted SuperNode is
  back at once instead of exiting with "Failed to activate SuperNode".

``genseg-fed supernode --plain`` runs the unmodified ``flower-supernode`` instead.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

from .. import simulation as _sim

__all__ = ["FLOWER_IDLE_POLL", "close_previous_session", "main", "patch_idle_poll"]

logger = logging.getLogger("genseg_fed.deploy.supernode")  # also when run as __main__

FLOWER_IDLE_POLL = 3.0  # s, hard-coded in Flower 1.42


def patch_idle_poll(poll_interval: float) -> None:
    """Make the SuperNode's sleeps (3 s when idle, 0.5 s while waiting on a reply) at most ``poll_interval``.

    Only ``flwr.supernode.start_client_internal`` sees the change: its module-level ``time`` is
    replaced by a namespace whose ``sleep`` is capped; every other module keeps the real ``time``.
    """
    if not 0.05 <= poll_interval <= FLOWER_IDLE_POLL:
        raise ValueError(f"poll interval must be between 0.05 and {FLOWER_IDLE_POLL} s, got {poll_interval}")
    from flwr.supernode import start_client_internal as sci

    real = time

    def sleep(seconds: float) -> None:
        real.sleep(min(seconds, poll_interval))

    sci.time = SimpleNamespace(**{k: getattr(real, k) for k in dir(real) if not k.startswith("__")})
    sci.time.sleep = sleep


class _NodeIdRecorder(logging.Handler):
    """Writes the id in Flower's "SuperNode ID: <id>" log line to a file (for the next start)."""

    def __init__(self, path: Path) -> None:
        super().__init__(logging.INFO)
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        match = re.match(r"SuperNode ID: (\d+)$", record.getMessage().strip())
        if match:
            with contextlib.suppress(OSError):
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text(match.group(1) + "\n")
                os.replace(tmp, self.path)


def _flower_option(flower_args: Sequence[str], name: str) -> str | None:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(name)
    known, _ = p.parse_known_args(list(flower_args))
    return getattr(known, name.lstrip("-").replace("-", "_"))


def close_previous_session(flower_args: Sequence[str], node_id_file: Path) -> bool:
    """Deactivate this node's session at the SuperLink if one is still open; True if one was closed.

    Signed with this SuperNode's own key, so it can only ever end its own node's session.
    """
    key_path = _flower_option(flower_args, "--auth-supernode-private-key")
    superlink = _flower_option(flower_args, "--superlink")
    if not key_path or not superlink or not node_id_file.is_file():
        return False
    try:
        node_id = int(node_id_file.read_text().strip())
    except ValueError:
        return False
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.proto.fleet_pb2 import DeactivateNodeRequest
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    try:
        key = load_ssh_private_key(Path(key_path).expanduser().read_bytes(), None)
        ca = _flower_option(flower_args, "--root-certificates")
        insecure = "--insecure" in flower_args
        with FleetHttpClient.from_server_address(
            superlink,
            insecure,
            None if insecure else (str(Path(ca).expanduser()) if ca else None),
            interceptors=[NodeAuthHttpInterceptor(key, key.public_key())],  # type: ignore[arg-type]
        ) as client:
            client.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
    except Exception as exc:  # not open (the usual case), or the SuperLink is not reachable yet
        logger.debug("no open session of node %d to close: %s", node_id, exc)
        return False
    logger.warning(
        "node %d was still marked online at the SuperLink (a previous instance crashed?); closed that session",
        node_id,
    )
    return True


def _log_to_stderr() -> None:
    """Our INFO messages on stderr; Flower's records stay with Flower's own handler (no duplicates)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ours = logging.getLogger("genseg_fed")
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False


def _timestamped_logs() -> None:
    """Flower's console log without colours but with a timestamp on every line (for the site's IT)."""
    from flwr.supercore.logger import update_console_handler

    update_console_handler(timestamps=True, colored=False)


def _runtime_port(flower_args: Sequence[str]) -> int:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--port", type=int, default=9094)
    p.add_argument("--isolation", default="subprocess")
    known, _ = p.parse_known_args(list(flower_args))
    if known.isolation != "process":
        raise SystemExit("--warm needs the SuperNode to run with --isolation process")
    return int(known.port)


def _start_runner(port: int, poll: float, secret: str | None) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "genseg_fed.deploy.runner",
        "--runtime-api-address",
        f"127.0.0.1:{port}",
        "--parent-pid",
        str(os.getpid()),
        "--poll-interval",
        str(poll),
        *(["--superexec-auth-secret-file", secret] if secret else []),
    ]
    # Same session and stdout as the SuperNode: systemd/docker/test teardown stop both together.
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, preexec_fn=_sim._child_setup())


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m genseg_fed.deploy.supernode [--poll-interval S] [--warm] -- <flower-supernode args>``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        ours, flower_args = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    else:
        ours, flower_args = [], argv
    p = argparse.ArgumentParser(
        prog="python -m genseg_fed.deploy.supernode", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--poll-interval", type=float, default=0.5, help="idle poll of the SuperLink, s (Flower: 3)"
    )
    p.add_argument(
        "--warm", action="store_true", help="start the warm ClientApp runner next to the SuperNode"
    )
    p.add_argument("--runner-poll-interval", type=float, default=0.1)
    p.add_argument(
        "--node-id-file", type=Path, help="remember the node id here; close a stale session at start"
    )
    args = p.parse_args(ours)
    _log_to_stderr()
    _timestamped_logs()
    patch_idle_poll(args.poll_interval)
    if args.node_id_file is not None:
        close_previous_session(flower_args, args.node_id_file)
        logging.getLogger("flwr").addHandler(_NodeIdRecorder(args.node_id_file))
    if args.warm:
        secret = _flower_option(flower_args, "--superexec-auth-secret-file")
        _start_runner(_runtime_port(flower_args), args.runner_poll_interval, secret)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()  # returns only through sys.exit (Flower's signal handlers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
