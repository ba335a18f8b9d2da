"""Mask augmentation: turn real masks into new plausible masks for the generator (MONAI transforms).

Per mask, independently: a horizontal flip (``flip_prob``; vertical flips would turn anatomy
upside down), a random affine (rotation ``+-rotate_deg``, scale ``1 +- scale``, translation
``+- translate`` of the side, shear ``+- shear``) and, with probability ``elastic_prob``, a smooth
elastic deformation (control points every quarter side, displacements of 2-5% of the side). The
affine and the elastic deformation are composed into one grid (MONAI ``Rand2DElastic`` with affine
ranges), so each mask is resampled once; otherwise ``RandAffine`` alone is used.

Masks are resampled *bilinearly and thresholded at 0.5* rather than by nearest neighbour: the
outlines of rotated or scaled masks stay smooth instead of staircased. Outside the input is
background (zero padding). A result with no foreground is redrawn up to :data:`MAX_TRIES` times,
then the input mask is returned unchanged, so a non-empty input never yields an empty output.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, OneOf, Rand2DElastic, RandAffine, RandFlip
from monai.utils import convert_to_tensor

from genseg_fed.config import AugmentConfig

__all__ = ["MAX_TRIES", "MaskAugmenter"]

MAX_TRIES = 4  # draws per mask before falling back to the input
ELASTIC_SPACING = 0.25  # control-point spacing, fraction of the side
ELASTIC_MAGNITUDE = (0.02, 0.05)  # control-point displacement range, fraction of the side


class MaskAugmenter:
    """Random plausible variations of binary masks, deterministic given ``seed``.

    Example::

        augment = MaskAugmenter(cfg.augment, seed=cfg.seed)
        new_masks = augment(masks)  # (B, 1, H, W) {0, 1} -> (B, 1, H, W) {0, 1}
    """

    def __init__(self, cfg: AugmentConfig, *, seed: int) -> None:
        self.cfg = cfg
        self._rng = np.random.RandomState(seed % 2**32)
        self._pipelines: dict[tuple[int, int], Compose] = {}  # one per mask size (ranges are in pixels)

    def __call__(self, masks: torch.Tensor) -> torch.Tensor:
        """Augment ``(B, 1, H, W)`` float masks in {0, 1}; returns the same shape, dtype and device, in {0, 1}."""
        if masks.ndim != 4 or masks.shape[1] != 1:
            raise ValueError(f"masks must be (B, 1, H, W), got {tuple(masks.shape)}")
        pipeline = self._pipeline(masks.shape[-2], masks.shape[-1])
        with torch.no_grad():
            source = masks.detach().float().cpu()
            out = [self._one(pipeline, mask) for mask in source]
            return torch.stack(out).to(device=masks.device, dtype=masks.dtype)

    def state_dict(self) -> dict[str, Any]:
        """RNG state of every transform, so a resumed run draws the same masks as an uninterrupted one."""
        return {"rng": copy.deepcopy(self._rng), "pipelines": copy.deepcopy(self._pipelines)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict`."""
        self._rng = copy.deepcopy(state["rng"])
        self._pipelines = copy.deepcopy(state["pipelines"])

    def _one(self, pipeline: Compose, mask: torch.Tensor) -> torch.Tensor:
        if not mask.any():
            return mask
        for _ in range(MAX_TRIES):
            new = (convert_to_tensor(pipeline(mask), track_meta=False) > 0.5).float()
            if new.any():
                return new
        return mask

    def _pipeline(self, height: int, width: int) -> Compose:
        """Flip, then one resampling: affine only, or (``elastic_prob``) affine + elastic together."""
        if (height, width) not in self._pipelines:
            cfg = self.cfg
            side = min(height, width)
            affine = {
                "rotate_range": (math.radians(cfg.rotate_deg),),
                "scale_range": (cfg.scale, cfg.scale),
                "translate_range": (cfg.translate * height, cfg.translate * width),
                "shear_range": (cfg.shear, cfg.shear),
                "mode": "bilinear",
                "padding_mode": "zeros",
            }
            elastic = Rand2DElastic(
                spacing=max(2.0, ELASTIC_SPACING * side),
                magnitude_range=(ELASTIC_MAGNITUDE[0] * side, ELASTIC_MAGNITUDE[1] * side),
                prob=1.0,
                **affine,
            )
            pipeline = Compose(
                [
                    RandFlip(prob=cfg.flip_prob, spatial_axis=1),
                    OneOf(
                        [RandAffine(prob=1.0, **affine), elastic],
                        weights=[1.0 - cfg.elastic_prob, cfg.elastic_prob],
                    ),
                ]
            )
            pipeline.set_random_state(state=self._rng)
            self._pipelines[(height, width)] = pipeline
        return self._pipelines[(height, width)]
