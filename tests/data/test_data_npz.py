"""The npz reader: tiny generated archives, then the shared real data sets (skipped when absent)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from genseg_fed.config import SiteSpec
from genseg_fed.data import DataError, load_site

SIZE = 16


def _spec(path: Path | str, key: str | None = "SITE", **kwargs) -> SiteSpec:
    return SiteSpec("npz-site", source="npz", path=str(path), key=key, **kwargs)


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    masks = np.zeros((5, 24, 24), np.uint8)
    masks[:, 6:18, 4:20] = 1
    path = tmp_path / "site.npz"
    np.savez(
        path,
        SITE_images=rng.integers(0, 256, (5, 24, 24, 3), dtype=np.uint8),
        SITE_masks=masks,
        SITE_ids=np.array([101, 102, 103, 104, 105], np.int16),
        OTHER_images=np.zeros((1, 4, 4, 3), np.uint8),
        OTHER_masks=np.ones((1, 4, 4), np.uint8),
    )
    return path


@pytest.mark.parametrize("channels", [1, 3])
def test_images(archive: Path, channels: int):
    data = load_site(_spec(archive), image_size=SIZE, channels=channels)
    assert data.images.shape == (5, channels, SIZE, SIZE) and data.masks.shape == (5, 1, SIZE, SIZE)
    assert data.images.min() >= -1 and data.images.max() <= 1 and set(np.unique(data.masks)) == {0, 1}
    assert data.ids == ("101", "102", "103", "104", "105") and data.groups == data.ids


def test_default_ids_and_grey_images(tmp_path: Path):
    path = tmp_path / "grey.npz"
    np.savez(path, G_images=np.full((2, 8, 8), 255, np.uint16), G_masks=np.ones((2, 8, 8), np.uint8))
    data = load_site(_spec(path, key="G"), image_size=SIZE, channels=1)
    assert data.ids == ("G-0000", "G-0001")


def test_volumes_multilabel(tmp_path: Path, caplog):
    labels = np.zeros((3, 6, 8, 10), np.uint8)
    labels[:, 2:4, 2:6, 3:5] = 1
    labels[:, 2:4, 2:6, 5:7] = 2  # two labels: foreground = label > 0
    path = tmp_path / "vol.npz"
    np.savez(
        path,
        train_images=np.ones((3, 6, 8, 10), np.float32),
        train_masks=labels,
        train_ids=np.array(["a", "b", "c"]),
    )
    with caplog.at_level(logging.INFO, logger="genseg_fed.data"):
        data = load_site(_spec(path, key="train", orientation="axial"), image_size=SIZE, channels=1)
    assert len(data) == 3 * 4 and data.groups[:4] == ("a",) * 4
    assert data.ids[:4] == ("a:axial003", "a:axial004", "a:axial005", "a:axial006")
    assert "label > 0" in data.description and "skipped 18 of 30" in caplog.text


def test_missing_file_names_path_and_variable(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("GENSEG_TEST_DATA", str(tmp_path))
    with pytest.raises(
        DataError, match=r"npz file .*missing\.npz \(expanded from '\$GENSEG_TEST_DATA/missing\.npz'\)"
    ):
        load_site(_spec("$GENSEG_TEST_DATA/missing.npz"), image_size=SIZE, channels=1)


def test_unset_variable(monkeypatch):
    monkeypatch.delenv("GENSEG_TEST_UNSET", raising=False)
    with pytest.raises(DataError, match="GENSEG_TEST_UNSET which are not set"):
        load_site(_spec("$GENSEG_TEST_UNSET/x.npz"), image_size=SIZE, channels=1)


@pytest.mark.parametrize("key", ["NOPE", None])
def test_missing_key_lists_keys(archive: Path, key: str | None):
    with pytest.raises(
        DataError, match=r"no array '.*_images'; set the site's 'key' to one of \['OTHER', 'SITE'\]"
    ):
        load_site(_spec(archive, key=key), image_size=SIZE, channels=1)


def test_shape_mismatch(tmp_path: Path):
    path = tmp_path / "bad.npz"
    np.savez(path, X_images=np.zeros((3, 8, 8, 3), np.uint8), X_masks=np.ones((3, 8, 9), np.uint8))
    with pytest.raises(
        DataError, match=r"key 'X': shapes disagree: images \(3, 8, 8, 3\), masks \(3, 8, 9\)"
    ):
        load_site(_spec(path, key="X"), image_size=SIZE, channels=1)


def test_ids_length_mismatch(tmp_path: Path):
    path = tmp_path / "bad.npz"
    np.savez(
        path, X_images=np.zeros((3, 8, 8), np.uint8), X_masks=np.ones((3, 8, 8), np.uint8), X_ids=np.arange(2)
    )
    with pytest.raises(DataError, match=r"'X_ids' has shape \(2,\) but there are 3 images"):
        load_site(_spec(path, key="X"), image_size=SIZE, channels=1)


def test_empty_masks_policy(tmp_path: Path):
    masks = np.ones((3, 8, 8), np.uint8)
    masks[1] = 0
    path = tmp_path / "e.npz"
    np.savez(path, X_images=np.zeros((3, 8, 8), np.uint8), X_masks=masks)
    with pytest.raises(DataError, match=r"1 mask\(s\) are empty .*first: id 'X-0001'.*data\.empty_masks"):
        load_site(_spec(path, key="X"), image_size=SIZE, channels=1)
    assert len(load_site(_spec(path, key="X"), image_size=SIZE, channels=1, empty_masks="skip")) == 2
    assert len(load_site(_spec(path, key="X"), image_size=SIZE, channels=1, empty_masks="keep")) == 3


def test_corrupt_file(tmp_path: Path):
    path = tmp_path / "broken.npz"
    path.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(DataError, match=r"cannot read .*broken\.npz"):
        load_site(_spec(path), image_size=SIZE, channels=1)


# ----------------------------------------------------------------------------- shared real data


@pytest.mark.parametrize(
    ("file", "key", "count"),
    [
        ("ph2_skin_128.npz", "PH2", 200),
        ("dermis_dermquest_skin_128.npz", "DermIS", 69),
        ("dermis_dermquest_skin_128.npz", "DermQuest", 137),
        ("drive_vessels_128.npz", "DRIVE", 40),
    ],
)
def test_shared_2d_sets(shared_file, file: str, key: str, count: int):
    data = load_site(_spec(shared_file(file), key=key), image_size=32, channels=3)
    assert data.images.shape == (count, 3, 32, 32) and data.masks.shape == (count, 1, 32, 32)
    assert data.images.min() >= -1 and data.images.max() <= 1
    assert data.masks.reshape(count, -1).any(axis=1).all()
    assert len(set(data.groups)) == count


def test_shared_hippocampus_volumes(shared_file):
    path = shared_file("msd_hippocampus_3d.npz")
    data = load_site(_spec(path, key="val", orientation="axial"), image_size=32, channels=1)
    assert len(set(data.groups)) == 52 and all(g.startswith("hippocampus_") for g in data.groups)
    assert data.ids[0].startswith(f"{data.groups[0]}:axial")
    assert data.masks.reshape(len(data), -1).any(axis=1).all()
    assert "label > 0" in data.description
