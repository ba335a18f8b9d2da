"""Embedded default data: white-matter segmentation on slices of the MNI152 template (``source: mni152``).

nilearn's wheel ships the MNI152 2009 template (a T1 MRI averaged over 152 subjects, 1 mm,
197 x 233 x 189) and its white-matter probability map, so the main job runs on real MRI without
any download. A site is built as follows:

1. slices along ``spec.orientation`` (stored axis order; axial = last axis) through the part of
   the brain where a slice holds at least :data:`MIN_WM_VOXELS` white-matter voxels, every
   ``step``-th slice so a site has about :data:`TARGET_SLICES` slices; the start is shifted by the
   profile's ``slice_offset`` so two sites with the same orientation never share a slice;
2. a square crop around the brain (the same for all slices of an orientation), turned so the
   brain is upright (superior / anterior at the top);
3. *simulated subject variability*: a small random smooth deformation (affine + elastic) per
   slice, applied jointly to the T1 image and the white-matter probability;
4. resizing to ``image_size`` (bilinear, antialiased); mask = white-matter probability > 0.5
   after resizing, so outlines are smooth;
5. a *simulated acquisition profile* (:data:`PROFILES`: gamma, bias field, resolution, blur,
   contrast, Rician noise) on the image only.

The result is real anatomy with a **simulated** domain shift (``SiteData.simulated_shift`` is
True and the description says so). Each slice is its own group (``mni152-<orientation>-<slice>``);
neighbouring slices (``step`` mm apart) are correlated, so train and test slices of one site are
not independent patients. Everything is deterministic: random draws come from a generator seeded
by the site name, profile and orientation, never from global state.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from genseg_fed.config import EmptyMaskPolicy, SiteSpec
from genseg_fed.data.site import (
    ORIENTATION_AXIS,
    DataError,
    SiteData,
    resize_images,
    stable_seed,
    to_channels,
)

__all__ = [
    "PROFILES",
    "AcquisitionProfile",
    "get_profile",
    "load_mni152_site",
    "simulate_acquisition",
    "thicken",
]

logger = logging.getLogger(__name__)

MIN_WM_VOXELS = 500  # a slice is used when it holds at least this many white-matter voxels (1 mm^2 each)
TARGET_SLICES = 50  # slices per site are about this many (40-60 depending on the orientation)
BRAIN_THRESHOLD = 0.05  # template intensity (0..1) above which a voxel counts as brain, for the crop
CROP_MARGIN = 4  # voxels of background kept around the brain
REFERENCE_SIZE = 64  # profile blur is given in pixels of a 64-pixel image and scaled with image_size

# simulated subject variability (per slice, in units of the crop side)
DEFORM_ROTATE_DEG = 5.0
DEFORM_SCALE = 0.05
DEFORM_TRANSLATE = 0.03
DEFORM_ELASTIC = 0.015  # std of control-point displacement
DEFORM_GRID = 4  # elastic control points per side


@dataclass(frozen=True)
class AcquisitionProfile:
    """A simulated scanner / protocol look, applied to images in ``[0, 1]`` (masks are untouched).

    Applied in this order: ``gamma`` (tissue contrast, ``x ** gamma``), a smooth multiplicative
    bias field of relative amplitude ``bias_field``, ``resolution`` (< 1: downsample the image by
    this factor, then upsample), Gaussian ``blur`` (sigma in pixels of a 64-pixel image, scaled with
    the image size), ``contrast`` (1 keeps the range, < 1 pulls values towards mid-grey), Rician
    noise of standard deviation ``noise``. ``slice_offset`` shifts the slice grid. ``thickness``
    (volume sources read by the npz reader only) simulates thick slices: before slicing, each voxel
    becomes the mean of ``thickness`` neighbouring slices along the slicing axis (partial volume),
    while the mask keeps the thin-slice truth.
    """

    gamma: float = 1.0
    bias_field: float = 0.0
    resolution: float = 1.0
    blur: float = 0.0
    contrast: float = 1.0
    noise: float = 0.0
    slice_offset: int = 0
    thickness: int = 1


PROFILES: dict[str, AcquisitionProfile] = {
    "scanner-a": AcquisitionProfile(gamma=0.9, bias_field=0.1, noise=0.015, slice_offset=0),
    "scanner-b": AcquisitionProfile(gamma=1.4, noise=0.05, blur=0.6, slice_offset=1),
    "scanner-c": AcquisitionProfile(bias_field=0.35, resolution=0.5, noise=0.02, slice_offset=2),
    # held-out look: clearly different (washed out, bright, blurred, noisy) but still learnable
    "scanner-d": AcquisitionProfile(
        gamma=0.7, bias_field=0.2, blur=0.8, contrast=0.7, noise=0.04, slice_offset=1
    ),
    # for real volumes split into sites (npz ``profile``), e.g. the MSD hippocampus sites of bench/:
    # thin-slice reference, a noisier 1.5 T-like look, a thick-slice low-resolution look, and a
    # clearly different held-out look. All SIMULATED.
    "mri-a": AcquisitionProfile(bias_field=0.1, noise=0.02),
    "mri-b": AcquisitionProfile(gamma=1.3, contrast=0.85, noise=0.05, thickness=2),
    "mri-c": AcquisitionProfile(bias_field=0.3, resolution=0.6, noise=0.03, thickness=3),
    "mri-d": AcquisitionProfile(gamma=0.75, bias_field=0.2, blur=0.7, contrast=0.7, noise=0.05, thickness=4),
}


def get_profile(name: str | None) -> AcquisitionProfile:
    """The registered profile called ``name``; :class:`DataError` (a ValueError) listing the valid names otherwise."""
    if name not in PROFILES:
        raise DataError(f"unknown mni152 acquisition profile {name!r}; choose one of {sorted(PROFILES)}")
    return PROFILES[name]


def load_mni152_site(
    spec: SiteSpec, *, image_size: int, channels: int, empty_masks: EmptyMaskPolicy = "error"
) -> SiteData:
    """Build a white-matter segmentation site from MNI152 slices (see the module docstring).

    Args:
        spec: the site; uses ``name``, ``orientation`` and ``profile`` (a key of :data:`PROFILES`).
        image_size: output side in pixels.
        channels: 1 or 3 (grey replicated).
        empty_masks: unused; slices are chosen to hold white matter (kept for a uniform reader signature).
    """
    try:
        profile = get_profile(spec.profile)
    except DataError as exc:
        raise DataError(f"site '{spec.name}': {exc}") from None
    t1, wm = _load_template()
    axis = ORIENTATION_AXIS[spec.orientation]

    # 1. slices with white matter, on a profile-specific grid
    wm_voxels = np.moveaxis(wm > 0.5, axis, 0).sum(axis=(1, 2))
    usable = np.flatnonzero(wm_voxels >= MIN_WM_VOXELS)
    first, last = int(usable[0]), int(usable[-1])
    step = max(1, math.ceil((last - first + 1) / TARGET_SLICES))
    chosen = np.arange(first + profile.slice_offset % step, last + 1, step)

    # 2. upright square crop around the brain
    t1_slices, wm_slices = _crop(np.moveaxis(t1, axis, 0), np.moveaxis(wm, axis, 0), chosen)

    # 3. + 4. simulated subject variability, then resize
    rng = np.random.default_rng(stable_seed("mni152", spec.name, spec.profile, spec.orientation))
    stack = torch.from_numpy(np.stack([t1_slices, wm_slices], axis=1))  # (n, 2, H, W)
    stack = _deform(stack, rng)
    stack = torch.from_numpy(resize_images(stack.numpy(), image_size))
    image, mask = stack[:, :1].clamp(0.0, 1.0), (stack[:, 1:] > 0.5).float()

    # 5. simulated acquisition
    image = _acquire(image, profile, rng, image_size)

    keep = mask.flatten(1).any(dim=1).numpy()
    dropped = int((~keep).sum())
    if dropped:
        logger.info(
            "site '%s': dropped %d slice(s) whose mask vanished at %d px", spec.name, dropped, image_size
        )
    chosen = chosen[keep]
    groups = tuple(f"mni152-{spec.orientation}-{i:03d}" for i in chosen)
    images = to_channels(image[keep].numpy() * 2.0 - 1.0, channels)
    description = (
        f"mni152 template (nilearn, real MRI average of 152 subjects): {len(chosen)} {spec.orientation} slices "
        f"{int(chosen[0])}..{int(chosen[-1])} step {step}, white-matter masks; SIMULATED subject deformation "
        f"and SIMULATED acquisition profile '{spec.profile}' (the domain shift is simulated, not real)"
    )
    return SiteData(
        name=spec.name,
        images=np.ascontiguousarray(images, dtype=np.float32),
        masks=mask[keep].numpy(),
        ids=groups,
        groups=groups,
        simulated_shift=True,
        description=description,
    )


def _load_template() -> tuple[np.ndarray, np.ndarray]:
    """T1 intensity and white-matter probability, both ``(197, 233, 189)`` float32 in ``[0, 1]``."""
    from nilearn import datasets  # imported here: nilearn.datasets takes ~2 s to import

    t1 = np.asarray(datasets.load_mni152_template(resolution=1).dataobj, dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).dataobj, dtype=np.float32)
    return t1, wm


def _crop(t1: np.ndarray, wm: np.ndarray, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Chosen slices of ``(n_all, A, B)`` stacks, cropped to a square around the brain and turned upright."""
    brain = (t1 > BRAIN_THRESHOLD).any(axis=0)
    rows, cols = np.flatnonzero(brain.any(axis=1)), np.flatnonzero(brain.any(axis=0))
    side = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 + 2 * CROP_MARGIN
    r0 = (rows[0] + rows[-1] + 1) // 2 - side // 2  # top-left corner; may lie outside the volume
    c0 = (cols[0] + cols[-1] + 1) // 2 - side // 2
    src_r = slice(max(r0, 0), min(r0 + side, t1.shape[1]))
    src_c = slice(max(c0, 0), min(c0 + side, t1.shape[2]))
    dst_r = slice(src_r.start - r0, src_r.stop - r0)
    dst_c = slice(src_c.start - c0, src_c.stop - c0)
    out = []
    for volume in (t1, wm):
        square = np.zeros((len(chosen), side, side), dtype=np.float32)
        square[:, dst_r, dst_c] = volume[chosen, src_r, src_c]
        out.append(np.ascontiguousarray(np.rot90(square, k=1, axes=(1, 2))))
    return out[0], out[1]


def _deform(stack: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random smooth deformation (affine + elastic), one per slice, applied to all channels of ``(n, C, H, W)``."""
    n = stack.shape[0]
    angle = np.deg2rad(rng.uniform(-DEFORM_ROTATE_DEG, DEFORM_ROTATE_DEG, n))
    scale = 1.0 + rng.uniform(-DEFORM_SCALE, DEFORM_SCALE, (n, 2))
    shift = rng.uniform(-2 * DEFORM_TRANSLATE, 2 * DEFORM_TRANSLATE, (n, 2))  # normalised coords span 2
    cos, sin = np.cos(angle), np.sin(angle)
    theta = np.stack(
        [
            np.stack([cos / scale[:, 0], -sin / scale[:, 0], shift[:, 0]], axis=1),
            np.stack([sin / scale[:, 1], cos / scale[:, 1], shift[:, 1]], axis=1),
        ],
        axis=1,
    )
    grid = F.affine_grid(torch.from_numpy(theta).float(), list(stack.shape), align_corners=False)
    coarse = rng.normal(0.0, 2 * DEFORM_ELASTIC, (n, 2, DEFORM_GRID, DEFORM_GRID)).astype(np.float32)
    field = F.interpolate(torch.from_numpy(coarse), size=stack.shape[-2:], mode="bicubic", align_corners=True)
    grid = grid + field.permute(0, 2, 3, 1)
    return F.grid_sample(stack, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _smooth_field(rng: np.random.Generator, n: int, size: int) -> torch.Tensor:
    """``(n, 1, size, size)`` smooth random field with values in ``[-1, 1]``."""
    coarse = torch.from_numpy(rng.normal(size=(n, 1, 3, 3)).astype(np.float32))
    field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)
    return field / field.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    padded = F.pad(image, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(out, kernel.view(1, 1, -1, 1))


def _acquire(
    image: torch.Tensor, profile: AcquisitionProfile, rng: np.random.Generator, size: int
) -> torch.Tensor:
    """Apply ``profile`` to ``(n, 1, S, S)`` images in ``[0, 1]``; returns ``[0, 1]``."""
    n = image.shape[0]
    image = image**profile.gamma
    if profile.bias_field:
        image = image * torch.exp(profile.bias_field * _smooth_field(rng, n, size))
    if profile.resolution < 1.0:
        low = max(2, round(size * profile.resolution))
        image = F.interpolate(image, size=(low, low), mode="bilinear", align_corners=False, antialias=True)
        image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
    if profile.blur:
        image = _gaussian_blur(image, profile.blur * size / REFERENCE_SIZE)
    image = 0.5 + profile.contrast * (image - 0.5)
    if profile.noise:
        real = torch.from_numpy(rng.normal(0.0, profile.noise, image.shape).astype(np.float32))
        imag = torch.from_numpy(rng.normal(0.0, profile.noise, image.shape).astype(np.float32))
        image = torch.sqrt((image + real) ** 2 + imag**2)
    return image.clamp(0.0, 1.0)


def simulate_acquisition(images: np.ndarray, profile: AcquisitionProfile, *, seed: int) -> np.ndarray:
    """Apply ``profile`` (all but ``thickness`` and ``slice_offset``) to ``(N, C, S, S)`` images in ``[-1, 1]``.

    Each channel is treated as a grey image; the random draws (bias field, noise) come from a generator
    seeded by ``seed``. Returns float32 ``(N, C, S, S)`` in ``[-1, 1]``.
    """
    n, c, size = images.shape[0], images.shape[1], images.shape[-1]
    if n == 0:
        return images.astype(np.float32)
    grey = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).reshape(n * c, 1, size, size)
    out = _acquire((grey + 1.0) / 2.0, profile, np.random.default_rng(seed), size)
    return (out * 2.0 - 1.0).reshape(n, c, size, size).numpy().astype(np.float32)


def thicken(volume: np.ndarray, *, axis: int, thickness: int) -> np.ndarray:
    """Mean of ``thickness`` neighbouring slices along ``axis`` (edges repeat); integer volumes stay integer."""
    if thickness <= 1:
        return volume
    from scipy.ndimage import uniform_filter1d

    smooth = uniform_filter1d(volume.astype(np.float32), size=thickness, axis=axis, mode="nearest")
    if np.issubdtype(volume.dtype, np.integer):
        info = np.iinfo(volume.dtype)
        return np.clip(np.rint(smooth), info.min, info.max).astype(volume.dtype)
    return smooth.astype(volume.dtype)
