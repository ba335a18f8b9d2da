"""``load_site``: pick the reader named by ``SiteSpec.source`` from a plain registry.

Kept apart from :mod:`genseg_fed.data.site` because the readers themselves build on ``site``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from genseg_fed.config import EmptyMaskPolicy, SiteSpec
from genseg_fed.data.folder import load_folder_site
from genseg_fed.data.mni152 import load_mni152_site
from genseg_fed.data.npz import load_npz_site
from genseg_fed.data.patients import apply_pattern
from genseg_fed.data.site import DataError, SiteData

__all__ = ["READERS", "load_site"]

logger = logging.getLogger(__name__)

Reader = Callable[..., SiteData]  # reader(spec, *, image_size, channels, empty_masks) -> SiteData

READERS: dict[str, Reader] = {
    "folder": load_folder_site,
    "npz": load_npz_site,
    "mni152": load_mni152_site,
}

_EMPTY_MASK_POLICIES = ("error", "skip", "keep")


def load_site(
    spec: SiteSpec, *, image_size: int, channels: int, empty_masks: EmptyMaskPolicy = "error"
) -> SiteData:
    """Read one site into a :class:`SiteData`: images ``(N, C, S, S)`` in ``[-1, 1]``, masks ``(N, 1, S, S)`` in {0, 1}.

    Args:
        spec: where the data comes from; ``spec.source`` picks the reader in :data:`READERS`.
        image_size: output side ``S`` in pixels (images are resized, aspect ratio not kept).
        channels: 1 (grey) or 3 (RGB).
        empty_masks: what to do with an all-background mask: ``"error"``, ``"skip"`` or ``"keep"``.

    Raises:
        DataError: (a ValueError) unknown source, or any problem with the site's files.
    """
    if spec.source not in READERS:
        raise DataError(
            f"site '{spec.name}': unknown source {spec.source!r}; valid sources: {sorted(READERS)}"
        )
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if empty_masks not in _EMPTY_MASK_POLICIES:
        raise ValueError(f"empty_masks must be one of {list(_EMPTY_MASK_POLICIES)}, got {empty_masks!r}")
    data = READERS[spec.source](spec, image_size=image_size, channels=channels, empty_masks=empty_masks)
    if spec.patient_pattern is not None:
        groups = apply_pattern(data.groups, spec.patient_pattern, site=spec.name)
        data = dataclasses.replace(
            data,
            groups=groups,
            description=f"{data.description}; {len(set(groups))} patients by pattern {spec.patient_pattern!r}",
        )
    logger.info("site '%s': %s", spec.name, data.description)
    return data
