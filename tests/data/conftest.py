"""Fixtures for the data-package tests: tiny in-memory sites."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest

from genseg_fed.data import SiteData


@pytest.fixture
def make_site() -> Callable[..., SiteData]:
    """``make_site(groups, size=8, name="site")``: a SiteData with one image per entry of ``groups``."""

    def make(groups: Sequence[str], *, size: int = 8, name: str = "site") -> SiteData:
        n = len(groups)
        rng = np.random.default_rng(0)
        images = rng.uniform(-1, 1, (n, 1, size, size)).astype(np.float32)
        masks = np.zeros((n, 1, size, size), dtype=np.float32)
        masks[:, :, 2:5, 2:5] = 1.0
        ids = tuple(f"{g}:{i}" for i, g in enumerate(groups))
        return SiteData(name=name, images=images, masks=masks, ids=ids, groups=tuple(groups))

    return make
