"""Secret random streams, one per (purpose, iteration, patient, image, copy), for the private trainer.

Under DP every random choice that touches a record's data must belong to that record alone and be unknown
to the coordinator: the augmentation of a patient's real images, the masks and intensity jitter of its
synthetic pairs, which of its pool pairs a batch uses. A shared stream would let one patient's presence
shift the draws every later patient gets (so a patient's "own" synthetic pair would depend on the others),
and a stream seeded by the public config seed would let anyone replay it.

:class:`RecordStreams` derives a ``torch.Generator`` for each key from the site's secret seed with
SHA-256 (:func:`genseg_fed.data.site.stable_seed`): keys never collide in practice, no stream is consumed
by two records, and a patient's draws depend only on the secret, the public iteration counter and its own
identity, never on which other patients are in the site.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.site import stable_seed

__all__ = ["RecordStreams"]


class RecordStreams:
    """Independent generators keyed by ``(purpose, iteration, patient, image, copy)``.

    Args:
        secret: the site's secret seed (``privacy.json``; never derived from the config).
        row_keys: for each training row (image), ``(patient id, index of the image within the patient)``.
    """

    def __init__(self, secret: int, row_keys: Sequence[tuple[str, int]]) -> None:
        self._secret = int(secret)
        self.row_keys = list(row_keys)

    def generator(self, purpose: str, iteration: int, patient: str, image: int, copy: int) -> torch.Generator:
        """The stream of one key (a fresh generator at its start)."""
        seed = stable_seed("genseg-fed/record-stream", self._secret, purpose, iteration, patient, image, copy)
        return torch.Generator().manual_seed(seed)

    def for_rows(
        self, purpose: str, iteration: int, rows: Sequence[int], copies: int = 1
    ) -> list[torch.Generator]:
        """One generator per (copy, row), copy-major: copy ``c`` of ``rows[r]`` at ``c * len(rows) + r``."""
        return [
            self.generator(purpose, iteration, *self.row_keys[int(r)], c) for c in range(copies) for r in rows
        ]
