"""Fewer, larger message objects: every weight record travels as one flat array.

Flower sends each ``Array`` of a message as its own object, fetched and stored with its own HTTPS
request (SuperLink <-> SuperNode, and again between each of them and its app process). The segmenter and
generator have 84 tensors in the tiny test model and 122 in the default one, so a train message
costs hundreds of requests; on a busy 2-core coordinator each took 100-150 ms. Packing concatenates the
float32 arrays of each ``ArrayRecord`` into one array and records the layout (names, shapes) in a
``ConfigRecord``; the other side restores the original record exactly. Nothing else changes: the
coordinator's code, Flower's strategies, the screening of updates and the privacy mods all see the
unpacked records.

* Coordinator: :class:`PackingGrid` wraps the ``Grid`` (packs what it pushes, unpacks what it pulls).
* Sites: :func:`packing_mod` on the ``ClientApp`` (unpacks what arrives; packs the reply if the
  request came packed, so an old coordinator that does not pack still works).

A reply whose layout does not fit its data is left packed: the coordinator's screening then rejects
it ("records other than the shared weights") and the reason is logged here.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

__all__ = [
    "LAYOUT_RECORD",
    "PackingError",
    "PackingGrid",
    "pack_content",
    "packing_enabled",
    "packing_mod",
    "unpack_content",
]

logger = logging.getLogger(__name__)

LAYOUT_RECORD = "packed-layout"  # ConfigRecord: record name -> JSON [[key, [shape...]], ...]
FLAT_KEY = "packed"  # the one Array of a packed ArrayRecord
MAX_TENSORS = 100_000
ENV_SWITCH = "GENSEG_PACK_WEIGHTS"  # "0": the coordinator sends one object per tensor (for measurements)


def packing_enabled() -> bool:
    """Whether the coordinator packs (on unless ``GENSEG_PACK_WEIGHTS=0``; sites follow the coordinator)."""
    return os.environ.get(ENV_SWITCH, "1") != "0"


class PackingError(ValueError):
    """A packed record whose layout does not describe its data."""


def _packable(record: ArrayRecord) -> bool:
    return len(record) > 1 and all(a.dtype == "float32" for a in record.values())


def pack_content(content: RecordDict) -> RecordDict:
    """A copy of ``content`` in which every multi-array float32 ``ArrayRecord`` is one flat array."""
    if LAYOUT_RECORD in content:
        return content  # already packed
    layouts: dict[str, str] = {}
    packed = RecordDict()
    for name, record in content.items():
        if isinstance(record, ArrayRecord) and _packable(record):
            arrays = {key: array.numpy() for key, array in record.items()}
            layouts[name] = json.dumps([[key, list(a.shape)] for key, a in arrays.items()])
            flat = np.concatenate([a.reshape(-1) for a in arrays.values()]).astype(np.float32, copy=False)
            packed[name] = ArrayRecord({FLAT_KEY: Array(flat)})
        else:
            packed[name] = record
    if not layouts:
        return content
    packed[LAYOUT_RECORD] = ConfigRecord(layouts)
    return packed


def _layout(text: Any) -> list[tuple[str, tuple[int, ...]]]:
    try:
        items = json.loads(str(text))
        layout = [(str(key), tuple(int(d) for d in shape)) for key, shape in items]
    except (ValueError, TypeError) as exc:
        raise PackingError(f"unreadable layout: {exc}") from None
    if not layout or len(layout) > MAX_TENSORS or any(d < 0 for _, s in layout for d in s):
        raise PackingError("layout is empty, too long or has negative sizes")
    if len({key for key, _ in layout}) != len(layout):
        raise PackingError("layout repeats a key")
    return layout


def unpack_content(content: RecordDict) -> RecordDict:
    """Inverse of :func:`pack_content`; raises :class:`PackingError` if a layout does not fit."""
    if LAYOUT_RECORD not in content:
        return content
    layouts = content[LAYOUT_RECORD]
    if not isinstance(layouts, ConfigRecord):
        raise PackingError(f"'{LAYOUT_RECORD}' is not a config record")
    unpacked = RecordDict()
    for name, record in content.items():
        if name == LAYOUT_RECORD:
            continue
        if name not in layouts:
            unpacked[name] = record
            continue
        if not isinstance(record, ArrayRecord) or set(record) != {FLAT_KEY}:
            raise PackingError(f"record '{name}' is not a packed array record")
        flat = record[FLAT_KEY].numpy()
        layout = _layout(layouts[name])
        sizes = [int(np.prod(shape, dtype=np.int64)) for _, shape in layout]
        if flat.dtype != np.float32 or flat.ndim != 1 or flat.size != sum(sizes):
            raise PackingError(
                f"record '{name}': {flat.size} {flat.dtype} values for a layout of {sum(sizes)} float32"
            )
        arrays, start = {}, 0
        for (key, shape), size in zip(layout, sizes, strict=True):
            arrays[key] = Array(np.ascontiguousarray(flat[start : start + size].reshape(shape)))
            start += size
        unpacked[name] = ArrayRecord(arrays)
    missing = sorted(set(layouts) - set(unpacked))
    if missing:
        raise PackingError(f"layout for missing records {missing}")
    return unpacked


def _replace_content(msg: Message, content: RecordDict) -> Message:
    """Swap a message's content in place (its metadata, ids and links stay as they are)."""
    msg.__dict__["_content"] = content
    return msg


def packing_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """ClientApp mod: unpack a packed request, and pack the reply to it."""
    if msg.has_error() or LAYOUT_RECORD not in msg.content:
        return call_next(msg, context)
    _replace_content(msg, unpack_content(msg.content))  # from our coordinator: a bad layout is a bug
    reply = call_next(msg, context)
    if not reply.has_error():
        _replace_content(reply, pack_content(reply.content))
    return reply


class PackingGrid:
    """A ``Grid`` that packs the messages it pushes and unpacks the replies it pulls."""

    def __init__(self, grid: Any) -> None:
        self._grid = grid

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = [m if m.has_error() else _replace_content(m, pack_content(m.content)) for m in messages]
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        for reply in replies:
            if reply.has_error() or LAYOUT_RECORD not in reply.content:
                continue
            try:
                _replace_content(reply, unpack_content(reply.content))
            except PackingError as exc:  # left packed: the screening rejects it and says so
                logger.warning(
                    "reply from node %d could not be unpacked: %s", reply.metadata.src_node_id, exc
                )
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        raise NotImplementedError(
            "PackingGrid supports push_messages/pull_messages (server.federation.exchange)"
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
