"""MaskAugmenter: new plausible binary masks, deterministic, never empty."""

from __future__ import annotations

import pytest
import torch

from genseg_fed.config import AugmentConfig
from genseg_fed.data import MaskAugmenter


def _masks(batch: int = 6, size: int = 32) -> torch.Tensor:
    masks = torch.zeros(batch, 1, size, size)
    for i in range(batch):
        masks[i, 0, 6 + i : 20 + i, 8 : 22 + i] = 1.0
    return masks


def test_shape_dtype_binary_nonempty():
    out = MaskAugmenter(AugmentConfig(), seed=0)(_masks())
    assert out.shape == (6, 1, 32, 32) and out.dtype == torch.float32 and type(out) is torch.Tensor
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    assert out.flatten(1).any(dim=1).all()


def test_changes_the_masks_independently():
    masks = _masks().new_zeros(6, 1, 32, 32)
    masks[:, 0, 8:24, 10:20] = 1.0  # six identical masks
    out = MaskAugmenter(AugmentConfig(), seed=0)(masks)
    assert not torch.equal(out, masks)
    assert len({tuple(o.flatten().tolist()) for o in out}) == 6  # per-sample randomness


def test_deterministic_given_seed():
    a, b = MaskAugmenter(AugmentConfig(), seed=3), MaskAugmenter(AugmentConfig(), seed=3)
    masks = _masks()
    assert torch.equal(a(masks), b(masks)) and torch.equal(a(masks), b(masks))
    assert not torch.equal(
        MaskAugmenter(AugmentConfig(), seed=4)(masks), MaskAugmenter(AugmentConfig(), seed=3)(masks)
    )


def test_identity_config_keeps_masks():
    cfg = AugmentConfig(flip_prob=0.0, rotate_deg=0.0, scale=0.0, translate=0.0, shear=0.0, elastic_prob=0.0)
    masks = _masks()
    assert torch.equal(MaskAugmenter(cfg, seed=0)(masks), masks)


def test_never_empty_even_for_tiny_masks_and_wild_settings():
    cfg = AugmentConfig(
        flip_prob=0.5, rotate_deg=180.0, scale=0.9, translate=0.5, shear=1.0, elastic_prob=1.0
    )
    masks = torch.zeros(16, 1, 16, 16)
    masks[:, 0, 0, 0] = 1.0  # one corner pixel: most draws push it out of the image
    out = MaskAugmenter(cfg, seed=0)(masks)
    assert out.flatten(1).any(dim=1).all()


def test_empty_input_stays_empty_and_other_sizes_work():
    augment = MaskAugmenter(AugmentConfig(), seed=0)
    assert not augment(torch.zeros(2, 1, 16, 16)).any()
    assert augment(_masks(2, 24)).shape == (2, 1, 24, 24)
    assert augment(_masks(2, 32).double()).dtype == torch.float64


def test_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        MaskAugmenter(AugmentConfig(), seed=0)(torch.zeros(2, 3, 16, 16))


def test_state_dict_resumes_the_same_draws() -> None:
    masks = _masks(4)
    aug = MaskAugmenter(AugmentConfig(), seed=3)
    aug(masks)
    state = aug.state_dict()
    expected = [aug(masks) for _ in range(3)]
    resumed = MaskAugmenter(AugmentConfig(), seed=99)
    resumed.load_state_dict(state)
    for want in expected:
        torch.testing.assert_close(resumed(masks), want)
