"""Crash-safe checkpoint files: written to a temporary file, then atomically renamed."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_checkpoint", "save_checkpoint", "write_json_atomic"]


def _atomic_write(path: Path, write: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # a reader sees the old file or the new one, never half of one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(state: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` that never leaves a truncated file behind if the process dies mid-write."""
    return _atomic_write(Path(path), lambda fh: torch.save(state, fh))


def load_checkpoint(path: str | os.PathLike[str]) -> Any:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors, dicts, RNG states) onto CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        # Our checkpoints hold numpy/python scalars next to tensors; they are our own files.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise RuntimeError(f"checkpoint {path} is unreadable ({exc}); delete it to start over") from exc


def write_json_atomic(data: Any, path: str | os.PathLike[str]) -> Path:
    """Write JSON (indented, NaN-free: non-finite floats become null) atomically."""

    def clean(x: Any) -> Any:
        if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    text = json.dumps(clean(data), indent=2, sort_keys=False).encode()
    return _atomic_write(Path(path), lambda fh: fh.write(text))
