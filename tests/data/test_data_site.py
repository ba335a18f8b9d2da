"""SiteData, the shared array helpers and the load_site registry."""

from __future__ import annotations

import numpy as np
import pytest

from genseg_fed.config import SiteSpec
from genseg_fed.data import READERS, DataError, SiteData, load_site
from genseg_fed.data.site import (
    mask_foreground,
    normalise_intensity,
    resize_images,
    resize_masks,
    stable_seed,
    to_channels,
)


def test_site_data_len_subset_and_properties(make_site):
    data = make_site(["a", "a", "b", "c"], size=8)
    assert len(data) == 4 and data.channels == 1 and data.image_size == 8
    sub = data.subset([3, 0])
    assert sub.ids == (data.ids[3], data.ids[0]) and sub.groups == ("c", "a")
    np.testing.assert_array_equal(sub.images[1], data.images[0])
    empty = data.subset([])
    assert len(empty) == 0 and empty.images.shape == (0, 1, 8, 8) and empty.masks.shape == (0, 1, 8, 8)


@pytest.mark.parametrize(
    ("images", "masks", "n_ids", "message"),
    [
        (np.zeros((2, 1, 4, 4), np.float64), np.zeros((2, 1, 4, 4), np.float32), 2, "float32"),
        (np.zeros((2, 4, 4), np.float32), np.zeros((2, 1, 4, 4), np.float32), 2, "(N, C, H, W)"),
        (np.zeros((2, 1, 4, 4), np.float32), np.zeros((2, 2, 4, 4), np.float32), 2, "masks must be"),
        (np.zeros((2, 1, 4, 4), np.float32), np.zeros((2, 1, 4, 4), np.float32), 3, "3 ids"),
    ],
)
def test_site_data_validates(images, masks, n_ids, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SiteData("bad", images, masks, tuple("abc"[:n_ids]), tuple("abc"[:n_ids]))


def test_normalise_uint8_is_exact():
    out = normalise_intensity(np.array([[0, 255], [127, 128]], dtype=np.uint8))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[-1.0, 1.0], [127 / 127.5 - 1, 128 / 127.5 - 1]], atol=1e-6)


@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.int16])
def test_normalise_other_dtypes_by_percentile(dtype):
    values = np.arange(1000, dtype=np.float64).reshape(10, 100) * 30  # fits int16
    out = normalise_intensity(values.astype(dtype))
    assert out.dtype == np.float32 and out.min() == -1.0 and out.max() == 1.0
    assert np.all(np.diff(out.ravel()) >= 0)  # monotone


def test_normalise_constant_and_non_finite():
    np.testing.assert_array_equal(normalise_intensity(np.full((3, 3), 7, np.uint16)), -1.0)
    out = normalise_intensity(np.array([np.nan, 0.0, 1.0, 2.0, np.inf], np.float32))
    assert np.isfinite(out).all() and out[0] == -1.0 and out[3] == 1.0


@pytest.mark.parametrize(
    ("in_channels", "out_channels", "expected"),
    [
        (1, 3, [0.5, 0.5, 0.5]),
        (3, 1, [0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6]),
        (4, 3, [0.2, 0.4, 0.6]),
        (2, 1, [0.5]),
        (3, 3, [0.2, 0.4, 0.6]),
    ],
)
def test_to_channels(in_channels, out_channels, expected):
    base = {1: [0.5], 2: [0.5, 1.0], 3: [0.2, 0.4, 0.6], 4: [0.2, 0.4, 0.6, 1.0]}[in_channels]
    images = np.asarray(base, np.float32).reshape(1, -1, 1, 1) * np.ones((1, 1, 2, 2), np.float32)
    out = to_channels(images, out_channels)
    assert out.shape == (1, out_channels, 2, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, 0, 0], expected, rtol=1e-6)


def test_to_channels_rejects_odd_channel_count():
    with pytest.raises(DataError, match="5 channels"):
        to_channels(np.zeros((1, 5, 2, 2), np.float32), 1)


def test_resize_images_and_masks():
    images = np.linspace(-1, 1, 2 * 3 * 20 * 12, dtype=np.float32).reshape(2, 3, 20, 12)
    out = resize_images(images, 16)
    assert out.shape == (2, 3, 16, 16) and out.min() >= -1 and out.max() <= 1
    masks = np.zeros((1, 1, 20, 12), np.float32)
    masks[..., 5:15, 3:9] = 1
    small = resize_masks(masks, 16)
    assert small.shape == (1, 1, 16, 16) and set(np.unique(small)) == {0.0, 1.0}


@pytest.mark.parametrize(
    ("values", "multilabel", "ok"),
    [
        ([0, 1], False, True),
        ([0, 255], False, True),
        ([0.0, 1.0], False, True),
        ([0], False, True),
        ([0, 1, 2], False, False),
        ([0, 1, 2], True, True),
        ([0, 128, 255], False, False),
        ([-1, 0, 1], True, False),
        ([0, 0.5, 1.0], True, False),
    ],
)
def test_mask_foreground(values, multilabel, ok):
    mask = np.asarray(values).reshape(1, -1)
    if ok:
        np.testing.assert_array_equal(mask_foreground(mask, where="m.png", multilabel=multilabel), mask > 0)
    else:
        with pytest.raises(DataError, match=r"m\.png: mask is not binary.*PNG"):
            mask_foreground(mask, where="m.png", multilabel=multilabel)


def test_stable_seed_is_pinned():
    # a fixed value: unlike hash(), the seed must not change between processes, machines or releases
    assert stable_seed("split", "hospital-a") == 730828123568616390
    assert 0 <= stable_seed("x") < 2**63 and stable_seed("a", "b") != stable_seed("b", "a")


def test_registry_and_unknown_source():
    assert set(READERS) == {"folder", "npz", "mni152"}
    with pytest.raises(
        ValueError, match=r"unknown source 'dicom'; valid sources: \['folder', 'mni152', 'npz'\]"
    ):
        load_site(SiteSpec("x", source="dicom"), image_size=16, channels=1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 16, "channels": 2}, "channels must be 1 or 3"),
        ({"image_size": 0, "channels": 1}, "image_size must be positive"),
        ({"image_size": 16, "channels": 1, "empty_masks": "drop"}, "empty_masks must be one of"),
    ],
)
def test_load_site_checks_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_site(SiteSpec("x", source="mni152", profile="scanner-a"), **kwargs)
