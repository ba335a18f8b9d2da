"""The folder reader: tiny PNG / JPEG / TIFF / NIfTI fixtures written into tmp_path."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from genseg_fed.config import SiteSpec
from genseg_fed.data import DataError, load_site, write_site_folder
from genseg_fed.data.site import resize_masks

SIZE = 16


def _rgb(h: int = 20, w: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _mask(h: int = 20, w: int = 24, value: int = 255) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = value
    return mask


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith((".nii", ".nii.gz")):
        nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    else:
        Image.fromarray(array).save(path)
    return path


def _site(root: Path, **kwargs) -> SiteSpec:
    return SiteSpec("clinic", source="folder", path=str(root), **kwargs)


def _load(root: Path, channels: int = 1, **kwargs):
    orientation = kwargs.pop("orientation", "axial")
    return load_site(_site(root, orientation=orientation), image_size=SIZE, channels=channels, **kwargs)


@pytest.fixture
def pngs(tmp_path: Path) -> Path:
    for i in range(3):
        _save(tmp_path / "images" / f"case{i}.png", _rgb(seed=i))
        _save(tmp_path / "masks" / f"case{i}.png", _mask())
    return tmp_path


# ----------------------------------------------------------------------------- happy paths


@pytest.mark.parametrize("channels", [1, 3])
def test_png_site(pngs: Path, channels: int):
    data = _load(pngs, channels=channels)
    assert data.name == "clinic" and len(data) == 3
    assert data.images.shape == (3, channels, SIZE, SIZE) and data.images.dtype == np.float32
    assert data.masks.shape == (3, 1, SIZE, SIZE) and data.masks.dtype == np.float32
    assert data.images.min() >= -1 and data.images.max() <= 1
    assert set(np.unique(data.masks)) == {0.0, 1.0}
    assert data.ids == ("case0", "case1", "case2") and data.groups == data.ids
    assert not data.simulated_shift and "3 images" in data.description


def test_uint8_mapping_is_exact_without_resize(tmp_path: Path):
    image = np.zeros((SIZE, SIZE), np.uint8)
    image[0, 0], image[0, 1] = 255, 51
    _save(tmp_path / "images" / "a.png", image)
    _save(tmp_path / "masks" / "a.png", _mask(SIZE, SIZE, value=1))
    data = _load(tmp_path)
    assert data.images[0, 0, 0, 0] == 1.0 and data.images[0, 0, 1, 1] == -1.0
    assert data.images[0, 0, 0, 1] == pytest.approx(51 / 127.5 - 1)


def test_jpg_image_with_png_mask(tmp_path: Path):
    _save(tmp_path / "images" / "lesion.jpg", _rgb())
    _save(tmp_path / "masks" / "lesion.png", _mask(value=1))
    data = _load(tmp_path, channels=3)
    assert data.ids == ("lesion",) and data.images.shape == (1, 3, SIZE, SIZE)


def test_tiff_16bit_scaled_by_percentiles(tmp_path: Path):
    image = (np.arange(20 * 24, dtype=np.uint16).reshape(20, 24) * 100).astype(np.uint16)
    _save(tmp_path / "images" / "xray.tif", image)
    _save(tmp_path / "masks" / "xray.tif", _mask())
    with Image.open(tmp_path / "images" / "xray.tif") as img:
        assert img.mode.startswith("I;16")
    data = _load(tmp_path)
    assert data.images.min() == pytest.approx(-1, abs=0.05) and data.images.max() == pytest.approx(
        1, abs=0.05
    )


@pytest.mark.parametrize(("orientation", "axis"), [("axial", 2), ("coronal", 1), ("sagittal", 0)])
def test_nifti_volume_is_sliced(tmp_path: Path, caplog, orientation: str, axis: int):
    volume = np.random.default_rng(0).normal(100, 30, (10, 12, 8)).astype(np.float32)
    labels = np.zeros((10, 12, 8), np.uint8)
    labels[3:7, 4:9, 2:6] = 1  # foreground in slices 3..6 / 4..8 / 2..5 along axes 0 / 1 / 2
    _save(tmp_path / "images" / "brain.nii.gz", volume)
    _save(tmp_path / "masks" / "brain.nii.gz", labels)
    with caplog.at_level(logging.INFO, logger="genseg_fed.data"):
        data = _load(tmp_path, orientation=orientation)
    expected = np.flatnonzero(labels.any(axis=tuple(a for a in range(3) if a != axis)))
    assert data.ids == tuple(f"brain:{orientation}{i:03d}" for i in expected)
    assert set(data.groups) == {"brain"}
    assert data.masks.reshape(len(data), -1).any(axis=1).all()
    assert data.images.min() >= -1 and data.images.max() <= 1
    skipped = volume.shape[axis] - len(expected)
    assert f"skipped {skipped} all-background volume slice" in caplog.text
    assert "1 volumes" in data.description


def test_nifti_2d_image_and_png_mask(tmp_path: Path):
    _save(tmp_path / "images" / "slice.nii", np.random.default_rng(1).random((20, 24)).astype(np.float32))
    _save(tmp_path / "masks" / "slice.png", _mask())
    data = _load(tmp_path)
    assert data.ids == ("slice",) and data.groups == ("slice",)


def _palette(fg: np.ndarray) -> Image.Image:
    img = Image.fromarray(fg.astype(np.uint8)).convert("P")
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 1 shown red; the index is the label
    return img


def _colour(fg: np.ndarray, rgba: tuple[int, ...]) -> Image.Image:
    colour = np.zeros((*fg.shape, len(rgba)), np.uint8)
    colour[fg] = rgba
    if len(rgba) == 4:
        colour[..., 3] = 255  # opaque background too
    return Image.fromarray(colour)


MASK_WRITERS = {
    "grey 0/1": lambda fg: Image.fromarray(fg.astype(np.uint8)),
    "grey 0/255": lambda fg: Image.fromarray(fg.astype(np.uint8) * 255),
    "16-bit 0/65535": lambda fg: Image.fromarray(fg.astype(np.uint16) * 65535),
    "1-bit": lambda fg: Image.fromarray(fg).convert("1"),
    "palette": _palette,
    "red on black RGB": lambda fg: _colour(fg, (200, 30, 30)),
    "white on black RGBA": lambda fg: _colour(fg, (255, 255, 255, 255)),
}


@pytest.mark.parametrize("kind", list(MASK_WRITERS))
def test_mask_formats(tmp_path: Path, kind: str):
    foreground = _mask(value=1).astype(bool)
    _save(tmp_path / "images" / "a.png", _rgb())
    (tmp_path / "masks").mkdir()
    MASK_WRITERS[kind](foreground).save(tmp_path / "masks" / "a.png")
    expected = resize_masks(foreground[None, None].astype(np.float32), SIZE)
    np.testing.assert_array_equal(_load(tmp_path).masks, expected)


def test_hidden_ignored_and_unsupported_logged(pngs: Path, caplog):
    (pngs / "images" / ".DS_Store").write_bytes(b"junk")
    (pngs / "images" / "notes.txt").write_text("hello")
    (pngs / "masks" / "case0.psd").write_bytes(b"junk")
    with caplog.at_level(logging.WARNING, logger="genseg_fed.data"):
        data = _load(pngs)
    assert len(data) == 3
    assert "ignored 2 file(s) with unsupported extensions" in caplog.text


@pytest.mark.parametrize(("policy", "expected"), [("skip", 2), ("keep", 3)])
def test_empty_mask_skip_and_keep(pngs: Path, caplog, policy: str, expected: int):
    _save(pngs / "masks" / "case1.png", np.zeros((20, 24), np.uint8))
    with caplog.at_level(logging.WARNING, logger="genseg_fed.data"):
        data = _load(pngs, empty_masks=policy)
    assert len(data) == expected
    if policy == "skip":
        assert "case1" not in data.ids and "skipped 1 image(s)/volume(s) with an empty mask" in caplog.text
    else:
        assert not data.masks[data.ids.index("case1")].any()


def test_write_site_folder_round_trip(pngs: Path, tmp_path: Path):
    data = _load(pngs, channels=3)
    write_site_folder(data, tmp_path / "copy")
    with Image.open(tmp_path / "copy" / "masks" / "case0.png") as img:
        assert set(np.unique(np.asarray(img))) == {0, 255}
    again = _load(tmp_path / "copy", channels=3)
    assert again.ids == data.ids
    np.testing.assert_array_equal(again.masks, data.masks)
    np.testing.assert_allclose(again.images, data.images, atol=1 / 127.5 + 1e-6)
    with pytest.raises(DataError, match="already holds"):
        write_site_folder(data, tmp_path / "copy")


# ----------------------------------------------------------------------------- errors


def test_missing_folder(tmp_path: Path):
    with pytest.raises(DataError, match=r"site 'clinic': folder .*nowhere does not exist"):
        _load(tmp_path / "nowhere")


@pytest.mark.parametrize("missing", ["images", "masks"])
def test_missing_subfolder(tmp_path: Path, missing: str):
    for sub in {"images", "masks"} - {missing}:
        (tmp_path / sub).mkdir()
    with pytest.raises(DataError, match=f"has no '{missing}/' subfolder"):
        _load(tmp_path)


def test_empty_site(tmp_path: Path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"no images found in .*images .*1 file\(s\) with other extensions"):
        _load(tmp_path)


def test_image_without_mask(pngs: Path):
    for i in range(12):
        _save(pngs / "images" / f"extra{i:02d}.png", _rgb())
    with pytest.raises(
        DataError, match=r"images without a mask .*: 12 \(extra00, .*extra09, \.\.\.\)"
    ) as err:
        _load(pngs)
    assert "extra10" not in str(err.value)


def test_mask_without_image(pngs: Path):
    _save(pngs / "masks" / "orphan.png", _mask())
    with pytest.raises(DataError, match=r"masks without an image .*: 1 \(orphan\)"):
        _load(pngs)


def test_size_mismatch_checked_before_resize(pngs: Path):
    _save(pngs / "masks" / "case2.png", _mask(20, 30))
    with pytest.raises(DataError, match=r"case2\.png has size 24x20 .* mask .*case2\.png has size 30x20"):
        _load(pngs)


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_non_binary_mask(pngs: Path, ext: str):
    (pngs / "masks" / "case0.png").unlink()
    noisy = _mask()
    noisy[0, :3] = [7, 128, 200]
    _save(pngs / "masks" / f"case0{ext}", noisy)
    with pytest.raises(
        DataError, match=r"case0\.(jpg|png): mask is not binary: found \d+ distinct values \(0, "
    ) as err:
        _load(pngs)
    assert "save them as PNG" in str(err.value)


def test_colour_mask_with_two_colours(pngs: Path):
    colour = np.zeros((20, 24, 3), np.uint8)
    colour[2:5, 2:5] = (255, 0, 0)
    colour[10:15, 10:15] = (0, 255, 0)
    _save(pngs / "masks" / "case1.png", colour)
    with pytest.raises(DataError, match=r"case1\.png: colour mask holds 3 colours"):
        _load(pngs)


def test_empty_mask_error_names_file_and_option(pngs: Path):
    _save(pngs / "masks" / "case1.png", np.zeros((20, 24), np.uint8))
    with pytest.raises(DataError, match=r"mask .*case1\.png is empty .*data\.empty_masks"):
        _load(pngs)


def test_empty_volume_follows_policy(tmp_path: Path):
    _save(tmp_path / "images" / "vol.nii.gz", np.ones((6, 6, 4), np.float32))
    _save(tmp_path / "masks" / "vol.nii.gz", np.zeros((6, 6, 4), np.uint8))
    with pytest.raises(DataError, match=r"vol\.nii\.gz is empty \(no foreground voxel"):
        _load(tmp_path)


@pytest.mark.parametrize("which", ["images", "masks"])
def test_corrupt_file(pngs: Path, which: str):
    (pngs / which / "case1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(DataError, match=rf"cannot read .*{which}.case1\.png: \w+"):
        _load(pngs)


def test_same_stem_twice(pngs: Path):
    _save(pngs / "images" / "case0.jpg", _rgb())
    with pytest.raises(DataError, match=r"'case0\.jpg' and 'case0\.png' have the same name 'case0'"):
        _load(pngs)
