"""Read a site from arrays in a NumPy ``.npz`` file (``source: npz``).

``spec.path`` names the file (``~`` and ``$VARS`` expanded) and ``spec.key`` the array prefix:

* ``<key>_images``: ``(N, H, W)``, ``(N, H, W, C)`` with C in {1, 3, 4} (channels last), or
  ``(N, D0, D1, D2)`` volumes when ``<key>_masks`` has that same 4D shape;
* ``<key>_masks``: ``(N, H, W)`` (or ``(N, H, W, 1)``) for images, ``(N, D0, D1, D2)`` for volumes;
  binary, or integer labels (then foreground = label > 0, and the description says so);
* ``<key>_ids`` (optional): one id per image or volume; default ``<key>-0000``, ``<key>-0001``, ...

``spec.records`` (``"start:stop"``) keeps only those records (images or volumes) of the file, so one
file can make several sites. ``spec.profile`` names a *simulated* acquisition profile
(:data:`genseg_fed.data.mni152.PROFILES`) applied on top of the real images (for volumes, its
``thickness`` first averages neighbouring slices, then the 2D effects apply to every slice); such a
site reports ``simulated_shift`` and says so in its description.

Works for the shared sets (``ph2_skin_128.npz`` key ``PH2``, ``dermis_dermquest_skin_128.npz``
keys ``DermIS`` / ``DermQuest``, ``drive_vessels_*.npz`` key ``DRIVE``, ``msd_hippocampus_3d.npz``
keys ``train`` / ``val``). Volumes are sliced along ``spec.orientation`` in stored axis order
(axial = last axis); all-background slices are skipped and counted, and every slice's group is
its volume id. Intensities: ``uint8`` maps to ``[-1, 1]`` exactly, anything else is scaled per
image (per volume) by its 0.5th..99.5th percentile.
"""

from __future__ import annotations

import dataclasses
import logging
import zipfile
from pathlib import Path

import numpy as np

from genseg_fed.config import ConfigError, EmptyMaskPolicy, SiteSpec
from genseg_fed.data.mni152 import AcquisitionProfile, get_profile, simulate_acquisition, thicken
from genseg_fed.data.site import (
    ORIENTATION_AXIS,
    DataError,
    SiteData,
    label_values,
    mask_foreground,
    normalise_intensity,
    resize_images,
    resize_masks,
    slice_volume,
    stable_seed,
    to_channels,
)

__all__ = ["load_npz_site"]

logger = logging.getLogger(__name__)


def load_npz_site(
    spec: SiteSpec, *, image_size: int, channels: int, empty_masks: EmptyMaskPolicy = "error"
) -> SiteData:
    """Read ``<key>_images`` / ``<key>_masks`` (and ``<key>_ids``) from the ``.npz`` at ``spec.path``.

    Args:
        spec: the site; uses ``name``, ``path``, ``key`` and ``orientation`` (for volumes).
        image_size: output side in pixels.
        channels: 1 or 3 output channels.
        empty_masks: ``"error"``, ``"skip"`` or ``"keep"`` 2D images with an all-background mask.
            Volume slices without foreground are always skipped (and counted).
    """
    path = _npz_path(spec)
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"site '{spec.name}': cannot read {path}: {type(exc).__name__}: {exc}") from exc
    with archive:
        keys = sorted(name[: -len("_images")] for name in archive.files if name.endswith("_images"))
        if spec.key is None or f"{spec.key}_images" not in archive.files:
            raise DataError(
                f"site '{spec.name}': {path} has no array '{spec.key}_images'; set the site's 'key' to one "
                f"of {keys} (arrays in the file: {sorted(archive.files)})"
            )
        if f"{spec.key}_masks" not in archive.files:
            raise DataError(f"site '{spec.name}': {path} has '{spec.key}_images' but no '{spec.key}_masks'")
        images = archive[f"{spec.key}_images"]
        masks = archive[f"{spec.key}_masks"]
        raw_ids = archive[f"{spec.key}_ids"] if f"{spec.key}_ids" in archive.files else None
    where = f"site '{spec.name}': {path} key '{spec.key}'"
    ids = _ids(raw_ids, len(images), spec.key, where)
    if spec.records is not None:
        try:
            chosen = spec.record_slice()
        except ConfigError as exc:
            raise DataError(str(exc)) from exc
        if not range(len(ids))[chosen]:
            raise DataError(f"{where}: records {spec.records!r} selects none of its {len(ids)} records")
        images, masks, ids = images[chosen], masks[chosen], ids[chosen]
    profile = None
    if spec.profile is not None:
        try:
            profile = get_profile(spec.profile)
        except DataError as exc:
            raise DataError(f"site '{spec.name}': {exc}") from None
    is_volume = masks.ndim == 4 and masks.shape == images.shape and masks.shape[-1] != 1
    if is_volume:
        data = _volumes(spec, path, images, masks, ids, image_size, channels, where, profile)
    else:
        data = _images(spec, path, images, masks, ids, image_size, channels, empty_masks, where, profile)
    notes = f" (records {spec.records})" if spec.records is not None else ""
    if profile is not None:
        notes += f"; SIMULATED acquisition profile '{spec.profile}' (the domain shift is simulated, not real)"
    return dataclasses.replace(
        data, simulated_shift=profile is not None, description=data.description + notes
    )


def _simulate(
    images: np.ndarray, spec: SiteSpec, profile: AcquisitionProfile | None, *parts: object
) -> np.ndarray:
    """The profile's 2D effects on ``(N, C, S, S)`` images, seeded by the site, profile and ``parts``."""
    if profile is None:
        return images
    return simulate_acquisition(images, profile, seed=stable_seed("npz", spec.name, spec.profile, *parts))


def _npz_path(spec: SiteSpec) -> Path:
    try:
        path = spec.resolved_path()
    except ConfigError as exc:
        raise DataError(str(exc)) from exc
    if not path.is_file():
        hint = f" (expanded from '{spec.path}')" if str(path) != spec.path else ""
        raise DataError(
            f"site '{spec.name}': npz file {path}{hint} not found; check the site's 'path' "
            "and any environment variable it uses"
        )
    return path


def _ids(raw: np.ndarray | None, n: int, key: str, where: str) -> list[str]:
    if raw is None:
        return [f"{key}-{i:04d}" for i in range(n)]
    if raw.shape != (n,):
        raise DataError(f"{where}: '{key}_ids' has shape {raw.shape} but there are {n} images")
    return [str(v) for v in raw.tolist()]


def _label_note(values: np.ndarray) -> str:
    positive = values[values > 0]
    if len(positive) <= 1:
        return ""
    return f"; foreground = label > 0 (labels {', '.join(f'{v:g}' for v in positive)} merged)"


def _images(
    spec: SiteSpec,
    path: Path,
    images: np.ndarray,
    masks: np.ndarray,
    ids: list[str],
    image_size: int,
    channels: int,
    empty_masks: EmptyMaskPolicy,
    where: str,
    profile: AcquisitionProfile | None = None,
) -> SiteData:
    if masks.ndim == 4 and masks.shape[-1] == 1:
        masks = masks[..., 0]
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4) or masks.shape != images.shape[:3]:
        raise DataError(
            f"{where}: shapes disagree: images {images.shape}, masks {masks.shape}; expected images "
            "(N, H, W[, C]) with C in {1, 3, 4} and masks (N, H, W), or equal (N, D0, D1, D2) volumes"
        )
    foreground = mask_foreground(masks, where=where, multilabel=True)
    small = resize_masks(foreground[:, None].astype(np.float32), image_size)
    empty = ~small.any(axis=(1, 2, 3))
    kept = np.flatnonzero(~empty)
    if empty.any():
        first = ids[int(np.flatnonzero(empty)[0])]
        if empty_masks == "error":
            raise DataError(
                f"{where}: {int(empty.sum())} mask(s) are empty at {image_size}x{image_size} (first: id "
                f"'{first}'); set data.empty_masks to 'skip' (drop them) or 'keep' (train on them)"
            )
        if empty_masks == "keep":
            kept = np.arange(len(ids))
        else:
            logger.warning("site '%s': skipped %d image(s) with an empty mask", spec.name, int(empty.sum()))
    if images.dtype == np.uint8:
        pixels = normalise_intensity(images[kept])
    else:
        pixels = np.stack([normalise_intensity(images[i]) for i in kept]) if len(kept) else images[kept]
    pixels = np.moveaxis(pixels, -1, 1).astype(np.float32)
    skipped = int(empty.sum()) if empty_masks == "skip" else 0
    return SiteData(
        name=spec.name,
        images=_simulate(resize_images(to_channels(pixels, channels), image_size), spec, profile),
        masks=small[kept],
        ids=tuple(ids[i] for i in kept),
        groups=tuple(ids[i] for i in kept),
        description=(
            f"npz {path} key '{spec.key}': {len(kept)} of {len(ids)} images "
            f"(skipped {skipped} empty masks){_label_note(label_values(masks))}"
        ),
    )


def _volumes(
    spec: SiteSpec,
    path: Path,
    volumes: np.ndarray,
    labels: np.ndarray,
    ids: list[str],
    image_size: int,
    channels: int,
    where: str,
    profile: AcquisitionProfile | None = None,
) -> SiteData:
    foreground = mask_foreground(labels, where=where, multilabel=True)
    axis = ORIENTATION_AXIS[spec.orientation]
    out_images, out_masks, out_ids, out_groups = [], [], [], []
    skipped = 0
    for v, volume_id in enumerate(ids):
        volume = (
            volumes[v] if profile is None else thicken(volumes[v], axis=axis, thickness=profile.thickness)
        )
        images, masks, slice_ids, dropped = slice_volume(
            volume,
            foreground[v],
            orientation=spec.orientation,
            image_size=image_size,
            channels=channels,
            volume_id=volume_id,
        )
        skipped += dropped
        if slice_ids:
            out_images.append(_simulate(images, spec, profile, volume_id))
            out_masks.append(masks)
            out_ids += slice_ids
            out_groups += [volume_id] * len(slice_ids)
    n_slices = len(out_ids) + skipped
    logger.info("site '%s': skipped %d of %d all-background volume slices", spec.name, skipped, n_slices)
    if not out_ids:
        raise DataError(f"{where}: no volume has any foreground voxel")
    return SiteData(
        name=spec.name,
        images=np.concatenate(out_images),
        masks=np.concatenate(out_masks),
        ids=tuple(out_ids),
        groups=tuple(out_groups),
        description=(
            f"npz {path} key '{spec.key}': {len(out_ids)} {spec.orientation} slices from {len(ids)} volumes "
            f"(skipped {skipped} of {n_slices} background-only slices){_label_note(label_values(labels))}"
        ),
    )
