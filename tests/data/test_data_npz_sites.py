"""Several sites from one npz file: ``records`` subsets and simulated acquisition profiles on real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from genseg_fed.config import ConfigError, SiteSpec
from genseg_fed.data import PROFILES, DataError, load_site
from genseg_fed.data.mni152 import thicken

SIZE = 16


def _spec(path: Path | str, key: str = "SITE", **kwargs) -> SiteSpec:
    return SiteSpec("npz-site", source="npz", path=str(path), key=key, **kwargs)


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    masks = np.zeros((5, 24, 24), np.uint8)
    masks[:, 6:18, 4:20] = 1
    path = tmp_path / "site.npz"
    np.savez(
        path,
        SITE_images=rng.integers(0, 256, (5, 24, 24), dtype=np.uint8),
        SITE_masks=masks,
        SITE_ids=np.array(["p1", "p2", "p3", "p4", "p5"]),
    )
    return path


@pytest.fixture
def volumes(tmp_path: Path) -> Path:
    """Four 8x8x6 volumes whose intensity grows along the last (axial) axis, a box of foreground."""
    images = np.broadcast_to(np.arange(6, dtype=np.uint8) * 40, (4, 8, 8, 6)).copy()
    labels = np.zeros((4, 8, 8, 6), np.uint8)
    labels[:, 2:6, 2:6, 1:5] = 1
    path = tmp_path / "vol.npz"
    np.savez(path, train_images=images, train_masks=labels, train_ids=np.array(["v0", "v1", "v2", "v3"]))
    return path


@pytest.mark.parametrize(
    ("records", "ids"),
    [("1:3", ("p2", "p3")), ("3:", ("p4", "p5")), (":2", ("p1", "p2")), ("0:5:2", ("p1", "p3", "p5"))],
)
def test_records_keep_a_slice_of_the_file(archive: Path, records: str, ids: tuple[str, ...]) -> None:
    data = load_site(_spec(archive, records=records), image_size=SIZE, channels=1)
    assert data.ids == ids and len(data) == len(ids)
    assert f"(records {records})" in data.description and not data.simulated_shift


def test_records_of_volumes_make_disjoint_sites(volumes: Path) -> None:
    a = load_site(_spec(volumes, key="train", records="0:2"), image_size=SIZE, channels=1)
    b = load_site(_spec(volumes, key="train", records="2:4"), image_size=SIZE, channels=1)
    assert set(a.groups) == {"v0", "v1"} and set(b.groups) == {"v2", "v3"}


@pytest.mark.parametrize("records", ["x", "1", "1:2:3:4", "a:b", "0:4:0"])
def test_malformed_records_are_a_config_error(archive: Path, records: str) -> None:
    with pytest.raises(ConfigError, match="records"):
        _spec(archive, records=records)


def test_records_selecting_nothing_is_a_clear_error(archive: Path) -> None:
    with pytest.raises(DataError, match=r"records '7:9' selects none of its 5 records"):
        load_site(_spec(archive, records="7:9"), image_size=SIZE, channels=1)


def test_a_profile_changes_images_not_masks_deterministically_and_is_reported(archive: Path) -> None:
    plain = load_site(_spec(archive), image_size=SIZE, channels=1)
    shifted = load_site(_spec(archive, profile="mri-d"), image_size=SIZE, channels=1)
    again = load_site(_spec(archive, profile="mri-d"), image_size=SIZE, channels=1)
    np.testing.assert_array_equal(shifted.masks, plain.masks)
    assert not np.allclose(shifted.images, plain.images)
    np.testing.assert_array_equal(shifted.images, again.images)
    assert shifted.images.min() >= -1 and shifted.images.max() <= 1
    assert shifted.simulated_shift and "SIMULATED acquisition profile 'mri-d'" in shifted.description


def test_unknown_profile_lists_the_valid_names(archive: Path) -> None:
    with pytest.raises(
        DataError, match=r"site 'npz-site': unknown mni152 acquisition profile 'nope'; choose one of"
    ):
        load_site(_spec(archive, profile="nope"), image_size=SIZE, channels=1)


def test_thick_slices_average_neighbours_along_the_slicing_axis() -> None:
    volume = np.broadcast_to(np.array([0, 30, 60, 90], np.uint8), (2, 2, 4))
    thick = thicken(volume, axis=2, thickness=3)
    assert thick.dtype == np.uint8
    np.testing.assert_array_equal(
        thick[0, 0], [10, 30, 60, 80]
    )  # edges repeat: (0+0+30)/3, ..., (60+90+90)/3
    assert thicken(volume, axis=2, thickness=1) is volume


def test_a_thick_slice_profile_blends_neighbouring_slices_of_a_volume(volumes: Path) -> None:
    assert PROFILES["mri-c"].thickness == 3
    plain = load_site(_spec(volumes, key="train"), image_size=SIZE, channels=1)
    thick = load_site(_spec(volumes, key="train", profile="mri-c"), image_size=SIZE, channels=1)
    assert plain.ids == thick.ids and thick.simulated_shift
    np.testing.assert_array_equal(plain.masks, thick.masks)  # the mask keeps the thin-slice truth
    assert not np.allclose(plain.images, thick.images)


def test_msd_hippocampus_sites_by_volume(shared_file) -> None:
    path = shared_file("msd_hippocampus_3d.npz")
    sites = [
        load_site(
            _spec(path, key="train", records=f"{start}:{start + 2}", profile=profile, orientation="axial"),
            image_size=32,
            channels=1,
        )
        for start, profile in ((0, "mri-a"), (2, "mri-b"))
    ]
    assert all(s.simulated_shift and len(set(s.groups)) == 2 for s in sites)
    assert not set(sites[0].groups) & set(sites[1].groups)
