"""One site's labelled images (:class:`SiteData`) and the array helpers every reader shares.

Layout and ranges, for every reader:

* images: ``(N, C, H, W)`` float32 in ``[-1, 1]``, ``H == W == image_size``, ``C`` in {1, 3};
* masks: ``(N, 1, H, W)`` float32 in ``{0, 1}`` (1 = foreground).

The helpers below turn raw arrays into that form: :func:`normalise_intensity` (8-bit images
``x / 127.5 - 1``, anything else scaled by its 0.5th..99.5th percentile), :func:`to_channels`
(grey -> replicated RGB, RGB(A) -> luminance, alpha dropped), :func:`resize_images` (bilinear with
antialiasing, like PIL) and :func:`resize_masks` (nearest neighbour), plus :func:`mask_foreground`,
which checks that a mask is binary. Aspect ratio is *not* preserved: every image is resized to a
square, as the shared data sets were.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "ORIENTATION_AXIS",
    "DataError",
    "SiteData",
    "label_values",
    "mask_foreground",
    "normalise_intensity",
    "resize_images",
    "resize_masks",
    "slice_volume",
    "stable_seed",
    "to_channels",
]

LUMINANCE = (0.299, 0.587, 0.114)  # ITU-R 601-2, the weights PIL uses for RGB -> L
PERCENTILES = (0.5, 99.5)  # intensity window for images that are not 8-bit
ORIENTATION_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}  # slicing axis in stored array order


class DataError(ValueError):
    """Input data is missing, unreadable or inconsistent; the message names the file/site and the fix."""


@dataclass(frozen=True, eq=False)
class SiteData:
    """All labelled images of one site, ready for training.

    Attributes:
        name: the site name (``SiteSpec.name``).
        images: ``(N, C, H, W)`` float32 in ``[-1, 1]``.
        masks: ``(N, 1, H, W)`` float32 in ``{0, 1}``.
        ids: one record id per image: a file stem, or ``"<volume>:<orientation><slice>"`` for slices.
        groups: patient / volume id per image; splits never put one group in two splits.
        simulated_shift: True when the site's acquisition shift is simulated (``mni152``).
        description: one line for reports: source, counts, skipped counts.
    """

    name: str
    images: np.ndarray
    masks: np.ndarray
    ids: tuple[str, ...]
    groups: tuple[str, ...]
    simulated_shift: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        n = self.images.shape[0] if self.images.ndim == 4 else -1
        if self.images.ndim != 4 or self.images.dtype != np.float32:
            raise DataError(
                f"site '{self.name}': images must be (N, C, H, W) float32, got "
                f"{self.images.shape} {self.images.dtype}"
            )
        if self.masks.dtype != np.float32 or self.masks.shape != (n, 1, *self.images.shape[2:]):
            raise DataError(
                f"site '{self.name}': masks must be (N, 1, H, W) float32 matching images "
                f"{self.images.shape}, got {self.masks.shape} {self.masks.dtype}"
            )
        if len(self.ids) != n or len(self.groups) != n:
            raise DataError(
                f"site '{self.name}': {n} images but {len(self.ids)} ids and {len(self.groups)} groups"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @classmethod
    def concat(cls, parts: Sequence[SiteData], name: str) -> SiteData:
        """Pool several sites' records (ids and groups get a ``<site>/`` prefix so they stay unique)."""
        if not parts:
            raise DataError(f"'{name}': nothing to pool")
        return cls(
            name=name,
            images=np.concatenate([p.images for p in parts]),
            masks=np.concatenate([p.masks for p in parts]),
            ids=tuple(f"{p.name}/{i}" for p in parts for i in p.ids),
            groups=tuple(f"{p.name}/{g}" for p in parts for g in p.groups),
            simulated_shift=any(p.simulated_shift for p in parts),
            description="pooled: " + "; ".join(f"{p.name} ({len(p)})" for p in parts),
        )

    def subset(self, indices: Sequence[int] | np.ndarray) -> SiteData:
        """A copy holding only the records at ``indices`` (in that order); may be empty."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return dataclasses.replace(
            self,
            images=self.images[idx],
            masks=self.masks[idx],
            ids=tuple(self.ids[i] for i in idx),
            groups=tuple(self.groups[i] for i in idx),
        )


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from the text of ``parts``; unlike ``hash()`` it is the same in every process."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def normalise_intensity(array: np.ndarray) -> np.ndarray:
    """Map raw intensities to float32 ``[-1, 1]``.

    ``uint8`` data is mapped exactly (``x / 127.5 - 1``). Any other dtype (16-bit, float) is scaled
    so the 0.5th..99.5th percentiles of the *whole* array map to -1..1, then clipped; call it once
    per image, or once per volume so that all slices of a volume share one window. Non-finite
    values (NaN outside the brain in some NIfTI files) and constant arrays map to -1.
    """
    if array.dtype == np.uint8:
        return (array.astype(np.float32) / 127.5 - 1.0).astype(np.float32)
    values = array.astype(np.float32)
    finite = np.isfinite(values)
    if not finite.any():
        return np.full(values.shape, -1.0, dtype=np.float32)
    lo, hi = np.percentile(values[finite], PERCENTILES)
    if not hi > lo:
        return np.full(values.shape, -1.0, dtype=np.float32)
    scaled = np.clip(np.where(finite, (values - lo) / (hi - lo), 0.0), 0.0, 1.0)
    return (scaled * 2.0 - 1.0).astype(np.float32)


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """Convert ``(N, C, H, W)`` images to ``channels`` (1 or 3) channels.

    ``C`` = 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA); alpha is dropped, grey is replicated
    to RGB, RGB becomes luminance (ITU-R 601-2 weights). Values keep their range.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    c = images.shape[1]
    if c == 2:
        images, c = images[:, :1], 1
    elif c == 4:
        images, c = images[:, :3], 3
    if c not in (1, 3):
        raise DataError(f"images have {c} channels; expected 1 (grey), 2, 3 (RGB) or 4 (RGBA)")
    if c == channels:
        return np.ascontiguousarray(images, dtype=np.float32)
    if channels == 3:
        return np.repeat(images, 3, axis=1).astype(np.float32)
    weights = np.asarray(LUMINANCE, dtype=np.float32).reshape(1, 3, 1, 1)
    return (images * weights).sum(axis=1, keepdims=True, dtype=np.float32)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resize ``(N, C, H, W)`` float images to ``(N, C, size, size)``: bilinear, antialiased when shrinking."""
    if images.shape[-2:] == (size, size):
        return np.ascontiguousarray(images, dtype=np.float32)
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    out = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.numpy()


def resize_masks(masks: np.ndarray, size: int) -> np.ndarray:
    """Resize ``(N, 1, H, W)`` {0, 1} masks to ``(N, 1, size, size)`` by nearest neighbour (pixel centres, as PIL)."""
    if masks.shape[-2:] == (size, size):
        return np.ascontiguousarray(masks, dtype=np.float32)
    x = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32))
    return F.interpolate(x, size=(size, size), mode="nearest-exact").numpy()


def label_values(mask: np.ndarray) -> np.ndarray:
    """Sorted distinct values of a label array (fast path for 8/16-bit unsigned and boolean masks)."""
    if mask.dtype in (np.bool_, np.uint8, np.uint16) and mask.size:
        return np.flatnonzero(np.bincount(mask.ravel().astype(np.intp, copy=False)))
    return np.unique(mask)


def mask_foreground(mask: np.ndarray, *, where: str, multilabel: bool = False) -> np.ndarray:
    """Boolean foreground of a label array, after checking that it is binary.

    A binary mask holds 0 and at most one positive value ({0, 1}, {0, 255}, ...). With
    ``multilabel=True`` any set of non-negative integer labels is accepted and foreground is
    ``label > 0``. ``where`` names the file (or array) in the error message.
    """
    values = label_values(mask)
    positive = values[values > 0]
    integral = bool(np.all(np.mod(values, 1) == 0))
    ok = values.min(initial=0) >= 0 and (len(positive) <= 1 or (multilabel and integral))
    if not ok:
        shown = ", ".join(f"{v:g}" for v in values[:10]) + (", ..." if len(values) > 10 else "")
        raise DataError(
            f"{where}: mask is not binary: found {len(values)} distinct values ({shown}); a mask must "
            "hold 0 for background and one positive value for foreground (e.g. {0, 1} or {0, 255}). "
            "Masks saved as JPEG get intermediate values from lossy compression: save them as PNG. "
            "A multi-label mask must be merged to one foreground label first."
        )
    return mask > 0


def slice_volume(
    volume: np.ndarray,
    foreground: np.ndarray,
    *,
    orientation: str,
    image_size: int,
    channels: int,
    volume_id: str,
) -> tuple[np.ndarray, np.ndarray, list[str], int]:
    """Cut a 3D volume and its boolean foreground into 2D training slices.

    The volume is normalised as a whole (:func:`normalise_intensity`), sliced along
    ``orientation`` (:data:`ORIENTATION_AXIS`, stored axis order), and slices whose mask is empty,
    before or after resizing, are dropped. Returns images ``(k, channels, S, S)``, masks
    ``(k, 1, S, S)``, ids ``"<volume_id>:<orientation><slice>"`` and the number of slices dropped.
    """
    axis = ORIENTATION_AXIS[orientation]
    fg = np.moveaxis(foreground, axis, 0)
    keep = np.flatnonzero(fg.any(axis=(1, 2)))
    masks = resize_masks(fg[keep, None].astype(np.float32), image_size)
    visible = masks.any(axis=(1, 2, 3))
    keep, masks = keep[visible], masks[visible]
    slices = np.moveaxis(normalise_intensity(volume), axis, 0)[keep, None]  # (k, 1, H, W)
    images = resize_images(to_channels(slices, channels), image_size)
    ids = [f"{volume_id}:{orientation}{i:03d}" for i in keep]
    return images, masks, ids, fg.shape[0] - len(keep)
