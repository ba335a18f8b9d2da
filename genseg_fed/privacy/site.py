"""What a private site keeps on disk beside its trainer state, and the scalars it reports.

``ReleaseLog`` (``<site dir>/privacy.json``, never sent, never pruned) holds the secret seed of the
noise and Poisson-sampling generators and a digest of the global weights each round was trained
from. With the trainer state of round r - 1 (which carries the accountant) a site can re-run round
r after a coordinator restart and release exactly the same weights again (same state, same inputs,
same noise: no new information). It refuses to train round r a second time from *different*
weights, which would reuse the same noise on another input, and refuses to train when the ledger
of the previous round is missing although it released weights before (its spent budget would
be unknown).

Reported metrics are flat scalars prefixed ``dp-``; a site that declines replies with
``declined = 1`` and these scalars only (no weights).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..checkpoint import write_json_atomic

__all__ = [
    "CENTRAL_WEIGHT",
    "DECLINED",
    "METRIC_PREFIX",
    "ReleaseLog",
    "declined_metrics",
    "is_declined",
    "privacy_metrics",
    "weights_digest",
]

DECLINED = "declined"  # metric set to 1.0 in a reply that carries no weights
CENTRAL_WEIGHT = "dp-uniform-weight"  # aggregation weight under client-level DP (1.0 for every site)
METRIC_PREFIX = "dp-"


def weights_digest(weights: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of a shared-weights mapping (names, shapes and float32 bytes, in sorted order)."""
    h = hashlib.sha256()
    for name in sorted(weights):
        arr = np.ascontiguousarray(weights[name], dtype=np.float32)
        h.update(name.encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


class ReleaseLog:
    """The site's secret seed and the rounds it has released (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if self.path.is_file():
            data = json.loads(self.path.read_text())
            self.seed = int(data["seed"])
            self.released: dict[str, str] = dict(data["released"])
        else:
            self.seed = secrets.randbits(62)
            self.released = {}
            self._save()

    def _save(self) -> None:
        write_json_atomic({"seed": self.seed, "released": self.released}, self.path)

    def check(self, server_round: int, digest: str, *, previous_state: bool) -> None:
        """Raise ``RuntimeError`` if training ``server_round`` from these weights is not safe."""
        done = self.released.get(str(server_round))
        if done is not None and done != digest:
            raise RuntimeError(
                f"privacy: round {server_round} was already trained and released from different global "
                "weights; training it again would reuse its noise on another input. Refusing."
            )
        earlier = [int(r) for r in self.released if int(r) < server_round]
        if earlier and not previous_state:
            raise RuntimeError(
                f"privacy: this site released weights in round(s) {sorted(earlier)} but its privacy ledger "
                f"after round {server_round - 1} is missing; its spent budget is unknown. Refusing."
            )

    def record(self, server_round: int, digest: str) -> None:
        self.released[str(server_round)] = digest
        self._save()


def privacy_metrics(report: Mapping[str, float]) -> dict[str, float]:
    """Trainer privacy report -> ``dp-*`` reply metrics."""
    return {f"{METRIC_PREFIX}{k}": float(v) for k, v in report.items()}


def declined_metrics(report: Mapping[str, float]) -> dict[str, float]:
    """The whole reply of a site that declines a round: a flag and its privacy numbers."""
    return {DECLINED: 1.0, **privacy_metrics(report)}


def is_declined(metrics: Mapping[str, float]) -> bool:
    return float(metrics.get(DECLINED, 0.0)) == 1.0
