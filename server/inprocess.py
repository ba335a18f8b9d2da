"""An in-process transport for the coordinator: each message goes straight to a ClientApp object.

:class:`InProcessGrid` implements the part of Flower's ``Grid`` that :func:`server.federation.run_federation`
uses (``get_node_ids``, ``push_messages``, ``pull_messages``). Every message is handled synchronously by the
ClientApp it was given (normally the real ``client.client_app.app``) with a real Flower ``Context`` per node,
so the coordinator, the message protocol and the site code are exactly those of ``genseg-fed simulate``;
only the SuperLink, the Ray workers and the process start-up are left out. Sites run one after the other.

Used by the tests (``tests/fed/conftest.py``) and the benchmarks (``bench/``)::

    from client.client_app import app
    grid = InProcessGrid.for_partitions(app, n_nodes=4, run_config=run_config)
    run_federation(grid, cfg, out_dir, site_state_dir=out_dir / "sites")

``server`` never imports ``client``: the caller passes the ClientApp in.
"""

from __future__ import annotations

import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["SERVER_NODE", "InProcessGrid", "Traffic", "record_bytes"]

SERVER_NODE = 0
FIRST_NODE = 100  # node ids are FIRST_NODE + partition id


def record_bytes(content: RecordDict) -> int:
    """Bytes of all array records in a message's content (``ArrayRecord.count_bytes``: data + keys)."""
    return sum(rec.count_bytes() for rec in content.array_records.values())


@dataclass(frozen=True)
class Traffic:
    """One message handled by a node: its type, array bytes each way and the node's handling time."""

    node: int
    message_type: str
    bytes_down: int  # array bytes the coordinator sent to the node
    bytes_up: int  # array bytes the node replied with (0 for an error reply)
    seconds: float  # wall time the ClientApp spent on the message
    error: bool


class InProcessGrid:
    """Grid-compatible transport that runs ``client_app`` synchronously for each message.

    Args:
        client_app: a Flower ``ClientApp`` (called as ``client_app(message, context)``).
        node_configs: node id -> node config (``partition-id`` / ``num-partitions`` in simulation, or
            ``site-name`` and friends as a deployed SuperNode would have).
        run_config: the run config every node sees (``config``, ``overrides``, ``state-dir`` ...).
        intercept: ``(node id, reply) -> replacement reply or None``, to play a bad actor in tests.
        keep_replies: keep every reply in :attr:`sent` (tests inspect them; long benchmarks turn it off).
    """

    def __init__(
        self,
        client_app: Callable[[Message, Context], Message],
        node_configs: Mapping[int, Mapping[str, Any]],
        run_config: Mapping[str, Any],
        *,
        intercept: Callable[[int, Message], Message | None] | None = None,
        keep_replies: bool = True,
    ) -> None:
        self.client_app = client_app
        self.node_configs = {n: dict(c) for n, c in node_configs.items()}
        self.run_config = dict(run_config)
        self.intercept = intercept
        self.keep_replies = keep_replies
        self.contexts = {n: self._context(n) for n in self.node_configs}
        self.sent: list[tuple[int, Message]] = []  # every reply a site sent (when keep_replies)
        self.traffic: list[Traffic] = []  # one entry per handled message
        self._outbox: dict[str, Message] = {}
        TaskIdentity.run_id = 1
        TaskIdentity.task_id = 1
        TaskIdentity.node_id = SERVER_NODE

    @classmethod
    def for_partitions(
        cls,
        client_app: Callable[[Message, Context], Message],
        *,
        n_nodes: int,
        run_config: Mapping[str, Any],
        **kwargs: Any,
    ) -> InProcessGrid:
        """Simulation-style nodes ``FIRST_NODE + i`` with ``partition-id = i`` (site *i* of sites + held-out)."""
        configs = {FIRST_NODE + i: {"partition-id": i, "num-partitions": n_nodes} for i in range(n_nodes)}
        return cls(client_app, configs, run_config, **kwargs)

    def _context(self, node: int) -> Context:
        """A fresh Flower context for ``node`` (empty ``state``, the current run config)."""
        return Context(1, node, self.node_configs[node], RecordDict(), self.run_config)

    def get_node_ids(self) -> list[int]:
        return list(self.node_configs)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            mid = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid
            msg.metadata.__dict__["_src_node_id"] = SERVER_NODE
            node = msg.metadata.dst_node_id
            if node not in self.contexts:
                ids.append("")
                continue
            TaskIdentity.node_id = node
            started = time.perf_counter()
            try:
                reply = self.client_app(msg, self.contexts[node])
            except Exception as exc:  # what the SuperNode does: an error reply, not a crash
                reason = f"{traceback.format_exc()}\n{type(exc).__name__}: {exc}"
                reply = Message(Error(code=2, reason=reason), reply_to=msg)
            finally:
                TaskIdentity.node_id = SERVER_NODE
            seconds = time.perf_counter() - started
            if self.intercept is not None:
                reply = self.intercept(node, reply) or reply
            error = reply.has_error()
            self.traffic.append(
                Traffic(
                    node=node,
                    message_type=str(msg.metadata.message_type),
                    bytes_down=record_bytes(msg.content),
                    bytes_up=0 if error else record_bytes(reply.content),
                    seconds=seconds,
                    error=error,
                )
            )
            if self.keep_replies:
                self.sent.append((node, reply))
            self._outbox[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._outbox.pop(m) for m in list(message_ids) if m in self._outbox]
