"""Synthetic pairs for level II: rendered once per refresh period into a pool, or fresh every step.

Record ``i`` of the training split owns ``size`` synthetic pairs: its mask, augmented, and the generator's
image of that mask (intensity-jittered when ``augment.synthetic_intensity``). A batch of real records
``rows`` takes ``per_real`` of each record's pairs, so a synthetic row always belongs to the record it
came from (the unit that privacy accounting and fair data access reason about).

Rendering runs the generator in training mode, so its dropout (``model.gen_dropout``) makes every
render of one mask a different image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..data import Augmenter
from ..models import MaskToImageGenerator

__all__ = ["SyntheticPool", "render"]


def render(
    generator: MaskToImageGenerator,
    masks: torch.Tensor,
    augmenter: Augmenter,
    *,
    intensity: bool,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Images for ``masks`` (B, 1, H, W); attached to the generator's graph unless called under no_grad.

    ``generators``: one random stream per row for the intensity jitter (None: the augmenter's own).
    """
    images = generator(masks)
    return augmenter.intensity(images, generators=generators) if intensity else images


class SyntheticPool:
    """``size`` synthetic pairs per training record, re-rendered by :meth:`refresh`.

    Args:
        masks: the training split's masks (N, 1, H, W), in record order.
        channels: image channels C.
        size: pairs kept per record (>= 1).
    """

    def __init__(self, masks: torch.Tensor, *, channels: int, size: int) -> None:
        if size < 1:
            raise ValueError(f"pool size must be >= 1 pair per record, got {size}")
        self.size = size
        n, _, h, w = masks.shape
        self.real_masks = masks
        self.masks = masks.repeat(size, 1, 1, 1)  # pair k of record i at k * N + i
        self.images = torch.zeros(size * n, channels, h, w, device=masks.device)
        self.refreshes = 0

    @torch.no_grad()
    def refresh(
        self,
        generator: MaskToImageGenerator,
        augmenter: Augmenter,
        *,
        intensity: bool,
        generators: Sequence[torch.Generator] | None = None,
    ) -> None:
        """New augmented masks for every record, and the generator's images of them.

        ``generators``: one random stream per pool pair (pair k of record i at ``k * N + i``) for its mask
        and intensity draws; None draws from the augmenter's shared stream.
        """
        self.masks = augmenter.masks(self.real_masks.repeat(self.size, 1, 1, 1), generators=generators)
        self.images = render(generator, self.masks, augmenter, intensity=intensity, generators=generators)
        self.refreshes += 1

    def pick(self, rows: torch.Tensor, per_real: int, generator: torch.Generator) -> torch.Tensor:
        """Pool indices of ``per_real`` distinct pairs of each record in ``rows`` (copy-major order:
        copy ``c`` of row ``r`` at ``c * len(rows) + r``)."""
        if per_real > self.size:
            raise ValueError(f"{per_real} synthetic pairs per record asked from a pool of {self.size}")
        n = self.real_masks.shape[0]
        copies = torch.argsort(torch.rand(len(rows), self.size, generator=generator), dim=1)[:, :per_real]
        return (copies.T * n + rows.cpu()[None, :]).reshape(-1).to(self.masks.device)

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.masks, "images": self.images, "refreshes": self.refreshes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks = state["masks"].to(self.masks.device)
        self.images = state["images"].to(self.images.device)
        self.refreshes = int(state["refreshes"])
