"""Augmenter: batched new masks (never empty), classic pair augmentation, intensity jitter; deterministic."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from monai.transforms import Compose, RandAffine, RandFlip

from genseg_fed.config import AugmentConfig
from genseg_fed.data import Augmenter

NO_INTENSITY = {"brightness": 0.0, "contrast": 0.0, "gamma": 0.0, "saturation": 0.0, "channel_gain": 0.0}
NO_SPATIAL = {
    "flip_prob": 0.0,
    "rotate_deg": 0.0,
    "scale": 0.0,
    "translate": 0.0,
    "shear": 0.0,
    "elastic_prob": 0.0,
}


def _masks(batch: int = 6, size: int = 32) -> torch.Tensor:
    masks = torch.zeros(batch, 1, size, size)
    for i in range(batch):
        masks[i, 0, 6 + i : 20 + i, 8 : 22 + i] = 1.0
    return masks


def test_shape_dtype_binary_nonempty():
    out = Augmenter(AugmentConfig(), seed=0).masks(_masks())
    assert out.shape == (6, 1, 32, 32) and out.dtype == torch.float32 and type(out) is torch.Tensor
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    assert out.flatten(1).any(dim=1).all()


def test_changes_the_masks_independently():
    masks = _masks().new_zeros(6, 1, 32, 32)
    masks[:, 0, 8:24, 10:20] = 1.0  # six identical masks
    out = Augmenter(AugmentConfig(), seed=0).masks(masks)
    assert not torch.equal(out, masks)
    assert len({tuple(o.flatten().tolist()) for o in out}) == 6  # per-sample randomness


def test_deterministic_given_seed():
    a, b = Augmenter(AugmentConfig(), seed=3), Augmenter(AugmentConfig(), seed=3)
    masks = _masks()
    assert torch.equal(a.masks(masks), b.masks(masks)) and torch.equal(a.masks(masks), b.masks(masks))
    assert not torch.equal(
        Augmenter(AugmentConfig(), seed=4).masks(masks), Augmenter(AugmentConfig(), seed=3).masks(masks)
    )


def test_identity_config_keeps_masks_and_pairs():
    cfg = AugmentConfig(**NO_SPATIAL, **NO_INTENSITY)
    masks = _masks()
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    aug = Augmenter(cfg, seed=0)
    assert torch.equal(aug.masks(masks), masks)
    new_images, new_masks = aug.pairs(images, masks)
    torch.testing.assert_close(new_images, images, atol=2e-4, rtol=0)  # up to the gamma clamp at -1
    assert torch.equal(new_masks, masks)


def test_never_empty_even_for_tiny_masks_and_wild_settings():
    cfg = AugmentConfig(
        flip_prob=0.5, rotate_deg=180.0, scale=0.9, translate=0.5, shear=1.0, elastic_prob=1.0
    )
    masks = torch.zeros(16, 1, 16, 16)
    masks[:, 0, 0, 0] = 1.0  # one corner pixel: most draws push it out of the image
    assert Augmenter(cfg, seed=0).masks(masks).flatten(1).any(dim=1).all()
    _, pair_masks = Augmenter(cfg, seed=0).pairs(torch.zeros(16, 1, 16, 16), masks)
    assert pair_masks.flatten(1).any(dim=1).all()


def test_random_stream_does_not_depend_on_the_masks():
    """Empty-mask redraws are drawn up front, so what one mask needs never shifts another's draws."""
    cfg = AugmentConfig(rotate_deg=180.0, translate=0.5, scale=0.9)
    tiny = torch.zeros(4, 1, 16, 16)
    tiny[:, 0, 0, 0] = 1.0
    big = torch.ones(4, 1, 16, 16)
    a, b = Augmenter(cfg, seed=1), Augmenter(cfg, seed=1)
    a.masks(tiny), b.masks(big)
    assert torch.equal(a.state_dict()["rng"], b.state_dict()["rng"])


def test_empty_input_stays_empty_and_other_sizes_work():
    augment = Augmenter(AugmentConfig(), seed=0)
    assert not augment.masks(torch.zeros(2, 1, 16, 16)).any()
    assert augment.masks(_masks(2, 24)).shape == (2, 1, 24, 24)
    assert augment.masks(_masks(2, 32).double()).dtype == torch.float64


def test_rejects_bad_shapes():
    aug = Augmenter(AugmentConfig(), seed=0)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        aug.masks(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="do not pair up"):
        aug.pairs(torch.zeros(3, 3, 16, 16), torch.zeros(2, 1, 16, 16))


def test_state_dict_resumes_the_same_draws() -> None:
    masks = _masks(4)
    aug = Augmenter(AugmentConfig(), seed=3)
    aug.masks(masks)
    state = aug.state_dict()
    expected = [aug.masks(masks) for _ in range(3)]
    resumed = Augmenter(AugmentConfig(), seed=99)
    resumed.load_state_dict(state)
    for want in expected:
        torch.testing.assert_close(resumed.masks(masks), want)


def test_pairs_warp_image_and_mask_alike():
    """An image that is its own mask stays its own mask after the spatial transform."""
    cfg = AugmentConfig(**NO_INTENSITY, elastic_prob=0.5)
    masks = _masks(8)
    images = masks.repeat(1, 3, 1, 1) * 2 - 1
    new_images, new_masks = Augmenter(cfg, seed=0).pairs(images, masks)
    assert not torch.equal(new_masks, masks)
    agree = ((new_images[:, :1] > 0).float() == new_masks).float().mean()
    assert agree > 0.995


def test_intensity_jitter_varies_tone_and_stays_in_range():
    images = torch.rand(32, 3, 16, 16) * 1.6 - 0.8
    out = Augmenter(AugmentConfig(), seed=0).intensity(images)
    assert out.shape == images.shape and out.min() >= -1 and out.max() <= 1
    shift = (out - images).mean(dim=(2, 3))  # per image and channel
    assert shift.std() > 0.02  # different tones per image
    same = Augmenter(AugmentConfig(**NO_INTENSITY), seed=0).intensity(images)
    torch.testing.assert_close(same, images, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ distribution against MONAI per mask


def _bar(n: int, size: int = 32) -> torch.Tensor:
    """A long thin vertical bar in the left half: its side tells flips, its axis the rotation."""
    masks = torch.zeros(n, 1, size, size)
    masks[:, 0, 6:26, 7:11] = 1.0
    return masks


def _stats(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per mask: is the centroid in the right half, principal-axis angle from vertical (deg), area."""
    _, _, h, w = masks.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    m = masks[:, 0].double()
    area = m.sum(dim=(1, 2))
    cx, cy = (m * xs).sum(dim=(1, 2)) / area, (m * ys).sum(dim=(1, 2)) / area
    dx, dy = xs - cx[:, None, None], ys - cy[:, None, None]
    sxx, syy, sxy = (m * dx * dx).sum((1, 2)), (m * dy * dy).sum((1, 2)), (m * dx * dy).sum((1, 2))
    angle = 0.5 * torch.atan2(2 * sxy, syy - sxx) * 180 / math.pi
    return (cx > (w - 1) / 2).double(), angle, area


def test_batched_masks_match_monai_per_mask_transform_in_distribution():
    cfg = AugmentConfig(
        flip_prob=0.5, rotate_deg=20.0, scale=0.15, translate=0.1, shear=0.1, elastic_prob=0.0
    )
    n, size = 600, 32
    ours = Augmenter(cfg, seed=0).masks(_bar(n, size))
    affine = {
        "rotate_range": (math.radians(cfg.rotate_deg),),
        "scale_range": (cfg.scale, cfg.scale),
        "translate_range": (cfg.translate * size, cfg.translate * size),
        "shear_range": (cfg.shear, cfg.shear),
        "mode": "bilinear",
        "padding_mode": "zeros",
    }
    reference = Compose([RandFlip(prob=cfg.flip_prob, spatial_axis=1), RandAffine(prob=1.0, **affine)])
    reference.set_random_state(seed=0)
    theirs = torch.stack([(torch.as_tensor(reference(m)) > 0.5).float() for m in _bar(n, size)])

    flip_a, angle_a, area_a = _stats(ours)
    flip_b, angle_b, area_b = _stats(theirs)
    assert abs(flip_a.mean() - 0.5) < 0.07 and abs(flip_b.mean() - 0.5) < 0.07
    assert abs(flip_a.mean() - flip_b.mean()) < 0.08
    # rotation: both spread the bar's axis over about +-20 degrees (uniform: std ~ 20 / sqrt(3) ~ 11.5)
    assert abs(angle_a.mean()) < 1.5 and abs(angle_b.mean()) < 1.5
    assert 8.0 < angle_a.std() < 15.0
    assert abs(angle_a.std() / angle_b.std() - 1.0) < 0.2
    assert abs(angle_a.abs().max() - angle_b.abs().max()) < 8.0
    assert abs(area_a.mean() / area_b.mean() - 1.0) < 0.05


def test_no_flip_no_rotation_keeps_the_statistics():
    cfg = dataclasses.replace(AugmentConfig(**NO_SPATIAL), translate=0.05)
    flips, angle, _ = _stats(Augmenter(cfg, seed=0).masks(_bar(50)))
    assert flips.sum() == 0 and angle.abs().max() < 1.0
