"""The embedded MNI152 sites: real template anatomy with simulated acquisition profiles."""

from __future__ import annotations

import numpy as np
import pytest

from genseg_fed.config import DataConfig, SiteSpec
from genseg_fed.data import PROFILES, DataError, SiteData, load_site
from genseg_fed.data.mni152 import AcquisitionProfile, get_profile

SIZE = 32


def _load(spec: SiteSpec, channels: int = 1) -> SiteData:
    return load_site(spec, image_size=SIZE, channels=channels)


@pytest.fixture(scope="module")
def default_sites() -> dict[str, SiteData]:
    cfg = DataConfig()
    return {spec.name: _load(spec) for spec in (*cfg.sites, *cfg.heldout)}


def test_shapes_ranges_and_masks(default_sites):
    for name, data in default_sites.items():
        n = len(data)
        assert 35 <= n <= 65, name
        assert data.images.shape == (n, 1, SIZE, SIZE) and data.images.dtype == np.float32
        assert data.masks.shape == (n, 1, SIZE, SIZE) and data.masks.dtype == np.float32
        assert data.images.min() >= -1 and data.images.max() <= 1
        assert set(np.unique(data.masks)) == {0.0, 1.0}
        assert data.masks.reshape(n, -1).any(axis=1).all()  # never an empty mask
        assert data.simulated_shift and "SIMULATED" in data.description
        assert len(set(data.groups)) == n and data.groups == data.ids
        assert all(g.startswith("mni152-") for g in data.groups)


def test_deterministic(default_sites):
    again = _load(SiteSpec("hospital-a", "mni152", orientation="axial", profile="scanner-a"))
    first = default_sites["hospital-a"]
    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.masks, again.masks)
    assert first.ids == again.ids


def test_same_orientation_sites_do_not_share_slices(default_sites):
    a, d = default_sites["hospital-a"], default_sites["hospital-d"]
    assert not set(a.groups) & set(d.groups)


def test_profiles_differ_and_heldout_look_is_distinct(default_sites):
    a, d = default_sites["hospital-a"], default_sites["hospital-d"]  # both axial, interleaved slices
    assert not np.allclose(a.images[: len(d)].mean(axis=(1, 2, 3)), d.images[: len(a)].mean(axis=(1, 2, 3)))
    # the held-out profile (scanner-d) is washed out: white matter stands out less from the rest
    contrast = {
        name: float(data.images[data.masks > 0].mean() - data.images[data.masks == 0].mean())
        for name, data in default_sites.items()
    }
    others = [contrast[name] for name in ("hospital-a", "hospital-b", "hospital-c")]
    assert contrast["hospital-d"] < 0.9 * min(others)


def test_profile_shifts_the_slice_grid():
    coronal = {
        p: _load(SiteSpec("s", "mni152", orientation="coronal", profile=p))
        for p in ("scanner-a", "scanner-b")
    }
    assert not set(coronal["scanner-a"].groups) & set(coronal["scanner-b"].groups)


def test_three_channels():
    data = _load(SiteSpec("rgb", "mni152", orientation="sagittal", profile="scanner-c"), channels=3)
    assert data.images.shape[1] == 3
    np.testing.assert_array_equal(data.images[:, 0], data.images[:, 2])


@pytest.mark.parametrize("profile", ["scanner-z", None])
def test_unknown_profile_lists_valid_names(profile):
    with pytest.raises(
        ValueError, match=r"site 'x': unknown mni152 acquisition profile .*scanner-a.*scanner-d"
    ):
        _load(SiteSpec("x", "mni152", profile=profile))


def test_profile_registry():
    scanners = {"scanner-a", "scanner-b", "scanner-c", "scanner-d"}  # the embedded MNI152 sites
    volumes = {"mri-a", "mri-b", "mri-c", "mri-d"}  # for real volumes split into sites (npz)
    assert set(PROFILES) == scanners | volumes
    assert isinstance(get_profile("scanner-b"), AcquisitionProfile)
    with pytest.raises(DataError):
        get_profile("nope")
