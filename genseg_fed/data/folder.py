"""Read a hospital's own labelled images from a folder (``source: folder``).

Layout::

    <path>/images/<stem>.<ext>     e.g. case001.jpg, brain07.nii.gz
    <path>/masks/<stem>.<ext>      e.g. case001.png, brain07.nii.gz

Images and masks are paired by file stem; their extensions may differ. Supported: PNG, JPEG,
BMP, TIFF, GIF (read with PIL) and NIfTI ``.nii`` / ``.nii.gz`` (read with nibabel). A 2D NIfTI
is one image; a 3D NIfTI is a volume, sliced along ``spec.orientation`` in the array's stored
axis order (axial = last axis, coronal = second, sagittal = first). All-background slices of a
volume are skipped and counted; every slice of a volume gets the volume stem as its group, so a
patient never ends up in two splits. Hidden files are ignored; files with other extensions are
counted and logged. An optional ``<path>/patients.csv`` (header ``file,patient``) says which images
belong to one patient (see :mod:`genseg_fed.data.patients`); without it every 2D image is its own patient.

Every problem raises :class:`~genseg_fed.data.site.DataError` naming the file and the fix:
missing folders, no images, unpaired files, image/mask size mismatch (checked before resizing),
non-binary masks, empty masks (per ``data.empty_masks``) and unreadable files.

Images: 8-bit data maps to ``[-1, 1]`` exactly; other dtypes (16-bit, float NIfTI) are scaled by
their 0.5th..99.5th percentile per image (per volume for NIfTI volumes). Then channels are
converted and everything is resized to ``image_size`` squared (see :mod:`genseg_fed.data.site`).
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from genseg_fed.config import ConfigError, EmptyMaskPolicy, SiteSpec
from genseg_fed.data.patients import PATIENTS_FILE, read_patients_csv, regroup
from genseg_fed.data.site import (
    DataError,
    SiteData,
    mask_foreground,
    normalise_intensity,
    resize_images,
    resize_masks,
    slice_volume,
    to_channels,
)

__all__ = ["IMAGE_EXTENSIONS", "load_folder_site", "write_site_folder"]

logger = logging.getLogger(__name__)

PIL_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
NIFTI_EXTENSIONS = (".nii", ".nii.gz")
IMAGE_EXTENSIONS = PIL_EXTENSIONS + NIFTI_EXTENSIONS
_MAX_LISTED = 10


@dataclass
class _Collected:
    """Records gathered while reading one site (internal)."""

    images: list[np.ndarray] = field(default_factory=list)  # each (k, C, S, S)
    masks: list[np.ndarray] = field(default_factory=list)  # each (k, 1, S, S)
    ids: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    n_files: int = 0
    n_volumes: int = 0
    skipped_empty: int = 0  # 2D images (policy "skip") and whole volumes with an empty mask
    skipped_slices: int = 0  # all-background volume slices (before or after resizing)

    def add(self, images: np.ndarray, masks: np.ndarray, ids: list[str], groups: list[str]) -> None:
        self.images.append(images)
        self.masks.append(masks)
        self.ids.extend(ids)
        self.groups.extend(groups)


def load_folder_site(
    spec: SiteSpec, *, image_size: int, channels: int, empty_masks: EmptyMaskPolicy = "error"
) -> SiteData:
    """Read ``spec.path``'s ``images/`` and ``masks/`` into a :class:`SiteData`.

    Args:
        spec: the site; uses ``name``, ``path`` and ``orientation`` (for volumes).
        image_size: output side in pixels.
        channels: 1 or 3 output channels.
        empty_masks: ``"error"`` (default), ``"skip"`` or ``"keep"`` 2D images whose mask is all
            background. Volume slices without foreground are always skipped (and counted).
    """
    root = _site_root(spec)
    image_files, ignored_images = _scan(root / "images")
    mask_files, ignored_masks = _scan(root / "masks")
    if ignored_images + ignored_masks:
        logger.warning(
            "site '%s': ignored %d file(s) with unsupported extensions in %s (supported: %s)",
            spec.name,
            ignored_images + ignored_masks,
            root,
            " ".join(IMAGE_EXTENSIONS),
        )
    if not image_files:
        raise DataError(
            f"site '{spec.name}': no images found in {root / 'images'} "
            f"(supported extensions: {' '.join(IMAGE_EXTENSIONS)}; "
            f"{ignored_images} file(s) with other extensions were ignored)"
        )
    _check_pairs(spec.name, root, image_files, mask_files)
    patients = None
    if (root / PATIENTS_FILE).is_file():
        patients = read_patients_csv(root / PATIENTS_FILE, list(image_files), site=spec.name)

    got = _Collected()
    for stem in sorted(image_files):
        image_path, mask_path = image_files[stem], mask_files[stem]
        image, image_is_volume = _read(image_path, spec.name, is_mask=False)
        mask, mask_is_volume = _read(mask_path, spec.name, is_mask=True)
        image_shape = image.shape if image_is_volume else image.shape[:2]
        mask_shape = mask.shape if mask_is_volume else mask.shape[:2]
        if image_is_volume != mask_is_volume or image_shape != mask_shape:
            raise DataError(
                f"site '{spec.name}': image {image_path} has size {_size(image_shape)} but its mask "
                f"{mask_path} has size {_size(mask_shape)}; a mask must have exactly its image's size"
            )
        got.n_files += 1
        if image_is_volume:
            _add_volume(got, spec, stem, image, mask, mask_path, image_size, channels, empty_masks)
        else:
            _add_image(got, spec, stem, image, mask, mask_path, image_size, channels, empty_masks)

    if got.skipped_empty:
        logger.warning(
            "site '%s': skipped %d image(s)/volume(s) with an empty mask (data.empty_masks=%s)",
            spec.name,
            got.skipped_empty,
            empty_masks,
        )
    if got.skipped_slices:
        logger.info("site '%s': skipped %d all-background volume slice(s)", spec.name, got.skipped_slices)
    if not got.ids:
        raise DataError(
            f"site '{spec.name}': no usable images in {root}: {got.skipped_empty} skipped for empty "
            f"masks, {got.skipped_slices} all-background slices"
        )
    skipped = [
        f"{got.skipped_empty} empty masks" if got.skipped_empty else "",
        f"{got.skipped_slices} background-only slices" if got.skipped_slices else "",
        f"{ignored_images + ignored_masks} unsupported files" if ignored_images + ignored_masks else "",
    ]
    skipped_text = ", ".join(s for s in skipped if s) or "nothing"
    sliced = f" ({got.n_volumes} volumes sliced {spec.orientation})" if got.n_volumes else ""
    groups = regroup(got.groups, patients) if patients is not None else tuple(got.groups)
    grouped = f"; {len(set(groups))} patients from {PATIENTS_FILE}" if patients is not None else ""
    description = (
        f"folder {root}: {len(got.ids)} images from {got.n_files} file pairs{sliced}; skipped {skipped_text}"
        f"{grouped}"
    )
    return SiteData(
        name=spec.name,
        images=np.concatenate(got.images),
        masks=np.concatenate(got.masks),
        ids=tuple(got.ids),
        groups=groups,
        description=description,
    )


def write_site_folder(data: SiteData, path: str | os.PathLike[str]) -> None:
    """Write ``data`` as ``path/images/<id>.png`` (8-bit grey or RGB) and ``path/masks/<id>.png`` ({0, 255}).

    Characters other than letters, digits, ``.``, ``_`` and ``-`` in ids become ``_``. When some images
    share a group (patient / volume), ``path/patients.csv`` records it, so the folder reads back with the
    same patients. Refuses to overwrite existing files.
    """
    root = Path(path)
    names = [re.sub(r"[^A-Za-z0-9._-]", "_", record_id) for record_id in data.ids]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})[:_MAX_LISTED]
        raise DataError(f"site '{data.name}': record ids give duplicate file names {dupes}")
    for sub in ("images", "masks"):
        folder = root / sub
        folder.mkdir(parents=True, exist_ok=True)
        clash = [n for n in names if (folder / f"{n}.png").exists()]
        if clash:
            raise DataError(f"{folder} already holds {clash[:_MAX_LISTED]}...; write into an empty folder")
    if list(data.groups) != list(data.ids) and (root / PATIENTS_FILE).exists():
        raise DataError(f"{root / PATIENTS_FILE} already exists; write into an empty folder")
    images = np.clip(np.rint((data.images + 1.0) * 127.5), 0, 255).astype(np.uint8)
    masks = (data.masks[:, 0] > 0.5).astype(np.uint8) * 255
    for name, image, mask in zip(names, images, masks, strict=True):
        pixels = image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1)
        Image.fromarray(pixels).save(root / "images" / f"{name}.png")
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    if list(data.groups) != list(data.ids):
        with (root / PATIENTS_FILE).open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["file", "patient"])
            writer.writerows((f"{name}.png", group) for name, group in zip(names, data.groups, strict=True))


# ----------------------------------------------------------------------------- reading


def _site_root(spec: SiteSpec) -> Path:
    try:
        root = spec.resolved_path()
    except ConfigError as exc:
        raise DataError(str(exc)) from exc
    if not root.is_dir():
        raise DataError(
            f"site '{spec.name}': folder {root} does not exist; it must contain images/ and masks/ subfolders"
        )
    for sub in ("images", "masks"):
        if not (root / sub).is_dir():
            raise DataError(
                f"site '{spec.name}': {root} has no '{sub}/' subfolder; put images in {root / 'images'} "
                f"and masks with the same file names in {root / 'masks'}"
            )
    return root


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem


def _is_supported(path: Path) -> bool:
    return path.name.lower().endswith(IMAGE_EXTENSIONS)


def _scan(folder: Path) -> tuple[dict[str, Path], int]:
    """Supported files by stem, and how many non-hidden entries were ignored."""
    files: dict[str, Path] = {}
    ignored = 0
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if not path.is_file() or not _is_supported(path):
            ignored += 1
            continue
        stem = _stem(path)
        if stem in files:
            raise DataError(
                f"{folder}: '{files[stem].name}' and '{path.name}' have the same name '{stem}'; "
                "keep one file per record"
            )
        files[stem] = path
    return files, ignored


def _listing(names: Iterable[str]) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_MAX_LISTED])
    return f"{len(names)} ({shown}{', ...' if len(names) > _MAX_LISTED else ''})"


def _check_pairs(site: str, root: Path, images: dict[str, Path], masks: dict[str, Path]) -> None:
    no_mask = images.keys() - masks.keys()
    no_image = masks.keys() - images.keys()
    problems = []
    if no_mask:
        problems.append(f"images without a mask in {root / 'masks'}: {_listing(no_mask)}")
    if no_image:
        problems.append(f"masks without an image in {root / 'images'}: {_listing(no_image)}")
    if problems:
        raise DataError(
            f"site '{site}': images and masks are paired by file name (extension may differ); "
            + "; ".join(problems)
        )


def _read(path: Path, site: str, *, is_mask: bool) -> tuple[np.ndarray, bool]:
    """Raw array of one file and whether it is a 3D volume.

    2D files give ``(H, W)`` or ``(H, W, C)``; volumes ``(D0, D1, D2)`` in stored order.
    """
    try:
        if path.name.lower().endswith(NIFTI_EXTENSIONS):
            array = np.asanyarray(nib.load(path).dataobj)
            while array.ndim > 3 and array.shape[-1] == 1:
                array = array[..., 0]
            if array.ndim not in (2, 3):
                raise ValueError(f"expected a 2D image or 3D volume, got shape {array.shape}")
            return np.asarray(array), array.ndim == 3
        with Image.open(path) as img:
            img.load()
            return _pil_array(img, is_mask=is_mask), False
    except Exception as exc:  # any decoder failure means the file cannot be used
        raise DataError(f"site '{site}': cannot read {path}: {type(exc).__name__}: {exc}") from exc


def _pil_array(img: Image.Image, *, is_mask: bool) -> np.ndarray:
    if img.mode == "1":
        img = img.convert("L")
    elif img.mode == "P" and not is_mask:  # palette masks keep their indices as labels
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    return np.asarray(img)


def _size(shape: tuple[int, ...]) -> str:
    if len(shape) == 2:
        return f"{shape[1]}x{shape[0]} (width x height)"
    return "x".join(str(s) for s in shape) + " (volume)"


def _mask_2d(mask: np.ndarray, path: Path) -> np.ndarray:
    """Boolean foreground of a 2D mask; colour masks are accepted when they hold black + one colour."""
    if mask.ndim == 3:
        mask = mask[..., :3] if mask.shape[-1] == 4 else mask[..., :1] if mask.shape[-1] == 2 else mask
        if np.all(mask == mask[..., :1]):
            mask = mask[..., 0]
        else:
            colours = np.unique(mask.reshape(-1, mask.shape[-1]), axis=0)
            if len(colours) > 2 or not np.any(np.all(colours == 0, axis=1)):
                raise DataError(
                    f"{path}: colour mask holds {len(colours)} colours {colours[:_MAX_LISTED].tolist()}; "
                    "a mask must be black background plus one foreground value; save it as grey PNG"
                )
            mask = np.any(mask != 0, axis=-1)
    return mask_foreground(mask, where=str(path))


def _empty_mask(policy: EmptyMaskPolicy, site: str, path: Path, reason: str) -> bool:
    """Apply ``data.empty_masks``; True when the record is kept."""
    if policy == "error":
        raise DataError(
            f"site '{site}': mask {path} {reason}. Fix the mask, or set data.empty_masks to "
            "'skip' (drop such images) or 'keep' (train on them as negatives)"
        )
    return policy == "keep"


def _add_image(
    got: _Collected,
    spec: SiteSpec,
    stem: str,
    image: np.ndarray,
    mask: np.ndarray,
    mask_path: Path,
    image_size: int,
    channels: int,
    empty_masks: EmptyMaskPolicy,
) -> None:
    foreground = _mask_2d(mask, mask_path)
    masks = resize_masks(foreground[None, None].astype(np.float32), image_size)
    if not masks.any():
        reason = (
            "is empty (all background)"
            if not foreground.any()
            else f"loses its {int(foreground.sum())} foreground pixel(s) when resized to {image_size}x{image_size}"
        )
        if not _empty_mask(empty_masks, spec.name, mask_path, reason):
            got.skipped_empty += 1
            return
    pixels = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)  # (C, H, W)
    images = resize_images(to_channels(normalise_intensity(pixels)[None], channels), image_size)
    got.add(images, masks, [stem], [stem])


def _add_volume(
    got: _Collected,
    spec: SiteSpec,
    stem: str,
    volume: np.ndarray,
    mask: np.ndarray,
    mask_path: Path,
    image_size: int,
    channels: int,
    empty_masks: EmptyMaskPolicy,
) -> None:
    got.n_volumes += 1
    foreground = mask_foreground(mask, where=str(mask_path))
    if not foreground.any():
        _empty_mask(empty_masks, spec.name, mask_path, "is empty (no foreground voxel in the volume)")
        got.skipped_empty += 1
        return
    images, masks, ids, dropped = slice_volume(
        volume,
        foreground,
        orientation=spec.orientation,
        image_size=image_size,
        channels=channels,
        volume_id=stem,
    )
    got.skipped_slices += dropped
    if ids:
        got.add(images, masks, ids, [stem] * len(ids))
