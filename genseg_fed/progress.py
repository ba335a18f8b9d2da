"""Progress of a federated run as JSON lines, written by the ServerApp and read by ``genseg-fed simulate``.

The ServerApp appends one JSON object per line to ``<out-dir>/progress.jsonl``::

    {"event": "start", "total": 10, "done": 0, "desc": "federated GenSeg"}
    {"event": "step", "n": 1, "desc": "round 1/5 hospital-a train"}
    {"event": "done"}

``done`` in ``start`` counts steps finished before a resume; other keys are ignored by the reader.
The simulation driver tails that file (which may not exist yet, and whose last line may be half
written) and turns it into a tqdm bar. Writing never raises: progress must not break a run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["PROGRESS_FILE", "LineTail", "ProgressReader", "ProgressWriter"]

logger = logging.getLogger(__name__)

PROGRESS_FILE = "progress.jsonl"


class ProgressWriter:
    """Appends progress events to a JSON-lines file; ``path=None`` (or ``""``) makes every call a no-op."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path else None

    @classmethod
    def in_dir(cls, out_dir: str | os.PathLike[str] | None) -> ProgressWriter:
        """The writer for ``<out_dir>/progress.jsonl`` (a no-op writer when ``out_dir`` is empty)."""
        return cls(Path(out_dir) / PROGRESS_FILE if out_dir else None)

    def start(self, total: int, desc: str = "", done: int = 0) -> None:
        """Announce ``total`` steps, ``done`` of them already finished (a resumed run); restarts the bar."""
        self._write({"event": "start", "total": int(total), "done": int(done), "desc": desc})

    def step(self, desc: str = "", n: int = 1) -> None:
        """``n`` more steps are done; ``desc`` says what is running now."""
        self._write({"event": "step", "n": int(n), "desc": desc})

    def done(self) -> None:
        """The run is over."""
        self._write({"event": "done"})

    def _write(self, event: dict[str, Any]) -> None:
        if self.path is None:
            return
        line = json.dumps(event) + "\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # One write of a whole line on an O_APPEND file: readers see it whole or not at all (mostly).
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line)
        except OSError as exc:
            logger.warning("could not write progress to %s: %s", self.path, exc)


class LineTail:
    """Returns the complete lines appended to a text file since the last call.

    A missing file yields nothing; a partial last line is kept until its newline arrives; a file that
    shrank (rewritten) is read again from its start.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._offset = 0
        self._partial = b""

    def read(self) -> list[str]:
        """New complete lines (without their newline), decoded as UTF-8 with replacement."""
        try:
            with self.path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < self._offset:  # truncated or replaced: start over
                    self._offset, self._partial = 0, b""
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        return [line.decode("utf-8", errors="replace").rstrip("\r") for line in lines]


class ProgressReader:
    """Parses the events of a progress file (see module docstring); malformed lines are skipped."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._tail = LineTail(path)

    def read(self) -> list[dict[str, Any]]:
        """New events since the last call, each a dict with at least ``"event"``."""
        events = []
        for line in self._tail.read():
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                logger.debug("skipping malformed progress line %r", line)
                continue
            if isinstance(event, dict) and isinstance(event.get("event"), str):
                events.append(event)
        return events
