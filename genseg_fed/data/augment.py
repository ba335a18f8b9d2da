"""Batched augmentation: new masks for synthetic pairs, classic augmentation of real pairs, intensity jitter.

One random spatial transform per row, applied to the whole batch at once with
``torch.nn.functional.affine_grid`` / ``grid_sample`` (no per-mask Python loop):

* a horizontal flip (``flip_prob``; vertical flips would turn anatomy upside down);
* a random affine: rotation ``+-rotate_deg``, scale ``1 +- scale`` per axis, shear ``+- shear``,
  translation ``+- translate`` of the side;
* with probability ``elastic_prob``, a smooth elastic displacement: uniform random displacements on a
  control grid every quarter side, 2-5 % of the side, upsampled bicubically, added to the affine grid,
  so each row is resampled once.

Masks are resampled *bilinearly and thresholded at 0.5* (smooth outlines instead of staircases).
:meth:`Augmenter.masks` pads with background and never turns a non-empty mask into an empty one: every
row gets :data:`MAX_TRIES` parameter draws up front (so the random stream consumed never depends on the
data) and keeps the first that leaves foreground, else its input. :meth:`Augmenter.pairs` (classic
augmentation) warps image and mask with the same grid, reflecting at the border so both stay
consistent, then jitters the image's intensity (:meth:`Augmenter.intensity`: brightness, contrast,
gamma, saturation and per-channel gain, each uniform in ``+-`` its range).

The draws come from one ``torch.Generator`` seeded by ``seed``; :meth:`state_dict` restores it. Every
public transform also takes ``generators``, one ``torch.Generator`` per row: row ``i`` then draws only from
``generators[i]`` (a fixed number of draws per row), so rows are independent of each other and of the shared
stream. The private trainer uses it to give every (iteration, record, copy) its own secret stream.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from genseg_fed.config import AugmentConfig

__all__ = ["ELASTIC_MAGNITUDE", "ELASTIC_SPACING", "MAX_TRIES", "Augmenter"]

MAX_TRIES = 4  # parameter draws per mask before falling back to the input
ELASTIC_SPACING = 0.25  # control-point spacing, fraction of the side
ELASTIC_MAGNITUDE = (0.02, 0.05)  # control-point displacement range, fraction of the side
_LUMA = (0.299, 0.587, 0.114)
Rows = Sequence[torch.Generator] | None  # one generator per row, or None: the shared stream


class Augmenter:
    """Random batched augmentation, deterministic given ``seed``.

    Example::

        augment = Augmenter(cfg.augment, seed=cfg.seed)
        new_masks = augment.masks(masks)              # (B, 1, H, W) {0, 1} -> (B, 1, H, W) {0, 1}
        images, masks = augment.pairs(images, masks)  # classic augmentation of real pairs
        images = augment.intensity(images)            # (B, C, H, W) in [-1, 1]
    """

    def __init__(self, cfg: AugmentConfig, *, seed: int) -> None:
        self.cfg = cfg
        self._rng = torch.Generator().manual_seed(seed % 2**63)

    # ------------------------------------------------------------------ public transforms
    @torch.no_grad()
    def masks(self, masks: torch.Tensor, *, generators: Rows = None) -> torch.Tensor:
        """New plausible masks from ``(B, 1, H, W)`` float masks in {0, 1}; same shape, dtype, device.

        ``generators``: one per row (see the module docstring); each gives :data:`MAX_TRIES` draws.
        """
        _check(masks, "masks", channels=1)
        b = masks.shape[0]
        _check_rows(generators, b)
        if b == 0:
            return masks.clone()
        src = masks.float()
        tries = None if generators is None else list(generators) * MAX_TRIES  # row of try k: k * b + r
        grids = self._grids(b * MAX_TRIES, masks.shape[-2], masks.shape[-1], masks.device, tries)
        grids = grids.view(MAX_TRIES, b, *grids.shape[1:])
        out = src.clone()
        todo = src.flatten(1).any(dim=1)  # an empty input stays empty
        for k in range(MAX_TRIES):
            if not todo.any():
                break
            idx = todo.nonzero().squeeze(1)
            new = (_warp(src[idx], grids[k, idx], padding="zeros") > 0.5).float()
            ok = new.flatten(1).any(dim=1)
            out[idx[ok]] = new[ok]
            todo[idx[ok]] = False
        return out.to(masks.dtype)

    @torch.no_grad()
    def pairs(
        self, images: torch.Tensor, masks: torch.Tensor, *, generators: Rows = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Classic augmentation: one spatial transform per pair on image and mask, then intensity jitter."""
        _check(masks, "masks", channels=1)
        _check(images, "images")
        if images.shape[0] != masks.shape[0] or images.shape[-2:] != masks.shape[-2:]:
            raise ValueError(f"images {tuple(images.shape)} and masks {tuple(masks.shape)} do not pair up")
        b, c = images.shape[:2]
        _check_rows(generators, b)
        if b == 0:
            return images.clone(), masks.clone()
        grid = self._grids(b, images.shape[-2], images.shape[-1], images.device, generators)
        both = _warp(torch.cat([images.float(), masks.float()], dim=1), grid, padding="reflection")
        new_masks = (both[:, c:] > 0.5).float()
        # A pair whose lesion left the frame keeps its original geometry (never an empty training mask
        # from a non-empty one).
        lost = masks.flatten(1).any(dim=1) & ~new_masks.flatten(1).any(dim=1)
        new_images = torch.where(lost[:, None, None, None], images.float(), both[:, :c])
        new_masks = torch.where(lost[:, None, None, None], masks.float(), new_masks)
        return self.intensity(new_images, generators=generators).to(images.dtype), new_masks.to(masks.dtype)

    def intensity(self, images: torch.Tensor, *, generators: Rows = None) -> torch.Tensor:
        """Brightness, contrast, gamma, saturation (RGB) and per-channel gain jitter; stays in [-1, 1].

        Differentiable in ``images`` (level III renders synthetic images through it on the graph).
        """
        _check(images, "images")
        cfg = self.cfg
        b, c = images.shape[:2]
        _check_rows(generators, b)
        dev = images.device
        u = self._uniform(b, 4 + c, dev, generators)  # one row of draws per image, whatever is enabled
        x = (images.float() + 1.0) / 2.0  # [0, 1]
        gain = 1.0 + cfg.channel_gain * u[:, 4:]
        x = x * gain[:, :, None, None]
        if c == 3:
            grey = sum(w * x[:, i : i + 1] for i, w in enumerate(_LUMA))
            sat = 1.0 + cfg.saturation * u[:, 3]
            x = grey + sat[:, None, None, None] * (x - grey)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        contrast = 1.0 + cfg.contrast * u[:, 1]
        x = mean + contrast[:, None, None, None] * (x - mean)
        x = x + cfg.brightness * u[:, 0][:, None, None, None] / 2.0
        gamma = torch.exp(cfg.gamma * u[:, 2])
        x = x.clamp(1e-4, 1.0).pow(gamma[:, None, None, None])  # no infinite gradient at 0
        return (x * 2.0 - 1.0).to(images.dtype)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The generator state, so a resumed run draws what an uninterrupted one would."""
        return {"rng": self._rng.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict`."""
        self._rng.set_state(state["rng"])

    # ------------------------------------------------------------------ sampling
    def _uniform(self, n: int, k: int, device: torch.device, generators: Rows = None) -> torch.Tensor:
        """``(n, k)`` uniform draws in [-1, 1]; row ``i`` from ``generators[i]`` when given."""
        if generators is None:
            u = torch.rand(n, k, generator=self._rng)
        elif n == 0:
            u = torch.zeros(0, k)
        else:
            u = torch.stack([torch.rand(k, generator=g) for g in generators])
        return (u * 2.0 - 1.0).to(device)

    def _grids(
        self, n: int, height: int, width: int, device: torch.device, generators: Rows = None
    ) -> torch.Tensor:
        """``n`` sampling grids ``(n, H, W, 2)``: flip, affine and (``elastic_prob``) elastic displacement."""
        cfg = self.cfg
        cpu = torch.device("cpu")
        u = self._uniform(n, 8, cpu, generators)
        flip = torch.where((u[:, 0] + 1.0) / 2.0 < cfg.flip_prob, -1.0, 1.0)
        angle = math.radians(cfg.rotate_deg) * u[:, 1]
        sx, sy = 1.0 + cfg.scale * u[:, 2], 1.0 + cfg.scale * u[:, 3]
        shear = cfg.shear * u[:, 4]
        tx, ty = 2.0 * cfg.translate * u[:, 5], 2.0 * cfg.translate * u[:, 6]  # normalised coordinates
        cos, sin = torch.cos(angle), torch.sin(angle)
        # output -> input coordinates: rotate(scale(shear(flip(x)))) + t
        a = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        a = a @ torch.diag_embed(torch.stack([sx, sy], -1))
        sh = torch.eye(2).repeat(n, 1, 1)
        sh[:, 0, 1] = shear
        a = a @ sh @ torch.diag_embed(torch.stack([flip, torch.ones_like(flip)], -1))
        theta = torch.cat([a, torch.stack([tx, ty], -1)[:, :, None]], dim=2)
        grid = F.affine_grid(theta, [n, 1, height, width], align_corners=False)

        elastic = (u[:, 7] + 1.0) / 2.0 < cfg.elastic_prob
        points = max(2, round(1.0 / ELASTIC_SPACING) + 1)
        if generators is None:
            coarse = self._uniform(n * points * points * 2, 1, cpu).view(n, 2, points, points)
        else:
            coarse = self._uniform(n, points * points * 2, cpu, generators).view(n, 2, points, points)
        magnitude = self._uniform(n, 1, cpu, generators).view(n, 1, 1, 1)
        lo, hi = ELASTIC_MAGNITUDE
        magnitude = 2.0 * (lo + (hi - lo) * (magnitude + 1.0) / 2.0)  # fraction of the side, normalised
        if elastic.any():
            field = F.interpolate(
                coarse * magnitude, size=(height, width), mode="bicubic", align_corners=True
            )
            grid = grid + field.permute(0, 2, 3, 1) * elastic[:, None, None, None]
        return grid.to(device)


def _check_rows(generators: Rows, n: int) -> None:
    if generators is not None and len(generators) != n:
        raise ValueError(f"{len(generators)} generators for {n} rows: give exactly one per row")


def _warp(x: torch.Tensor, grid: torch.Tensor, *, padding: str) -> torch.Tensor:
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode=padding, align_corners=False)


def _check(x: torch.Tensor, name: str, *, channels: int | None = None) -> None:
    if x.ndim != 4 or (channels is not None and x.shape[1] != channels):
        shape = f"(B, {channels}, H, W)" if channels else "(B, C, H, W)"
        raise ValueError(f"{name} must be {shape}, got {tuple(x.shape)}")
