"""Losses of the three GenSeg levels, each averaging per-sample terms.

Every loss here is a mean over the batch of independent per-sample losses. That keeps them
decomposable per record, which per-sample clipping (DP-SGD) relies on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

__all__ = ["SegmentationLoss", "discriminator_loss", "generator_adversarial_loss", "reconstruction_loss"]


class SegmentationLoss(torch.nn.Module):
    """Dice + binary cross-entropy on logits, as a mean of per-sample terms.

    Args (forward / :meth:`per_sample`):
        logits: (B, 1, H, W) raw segmenter outputs.
        masks: (B, 1, H, W) in {0, 1}.
        weights: optional (B,) per-sample weights (forward only): the loss is ``mean(w_i * l_i)``.
    ``forward`` returns a scalar, ``per_sample`` the (B,) terms ``l_i`` = soft Dice loss + mean pixel BCE.
    """

    def __init__(self) -> None:
        super().__init__()
        # reduction="none", batch=False: one Dice term per sample -> the loss decomposes per record.
        self.dice = DiceLoss(sigmoid=True, batch=False, reduction="none", smooth_nr=1e-5, smooth_dr=1e-5)

    def per_sample(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        dice = self.dice(logits, masks).flatten(1).mean(dim=1)
        bce = F.binary_cross_entropy_with_logits(logits, masks, reduction="none").flatten(1).mean(dim=1)
        return dice + bce

    def forward(
        self, logits: torch.Tensor, masks: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        terms = self.per_sample(logits, masks)
        return terms.mean() if weights is None else (terms * weights).mean()


def discriminator_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """Least-squares GAN loss for the discriminator on patch logits (B, 1, h, w)."""
    return 0.5 * (F.mse_loss(d_real, torch.ones_like(d_real)) + F.mse_loss(d_fake, torch.zeros_like(d_fake)))


def generator_adversarial_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """Least-squares GAN loss for the generator: make the discriminator call fakes real."""
    return F.mse_loss(d_fake, torch.ones_like(d_fake))


def reconstruction_loss(fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """pix2pix L1 term between generated and real images, both (B, C, H, W) in [-1, 1]."""
    return F.l1_loss(fake, real)
