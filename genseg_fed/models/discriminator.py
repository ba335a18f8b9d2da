"""Conditional PatchGAN discriminator (pix2pix) on ``cat(mask, image)``, built on MONAI's.

MONAI's ``PatchDiscriminator`` defaults to BatchNorm and returns every intermediate feature
map; here it uses GroupNorm and returns only the patch logits.
"""

from __future__ import annotations

import logging

from monai.networks.nets import PatchDiscriminator
from torch import Tensor

from .utils import norm_groups

__all__ = ["ConditionalPatchDiscriminator", "build_discriminator"]

logger = logging.getLogger(__name__)


class ConditionalPatchDiscriminator(PatchDiscriminator):
    """PatchGAN judging whether ``image`` is a real rendering of ``mask``.

    Args:
        in_channels: image channels C; the network input has ``1 + C`` channels.
        features: filters of the first convolution, doubled in each further layer.
        layers: number of normalised convolution layers after the first one (``num_layers_d``).

    ``forward``: ``cat((mask, image), dim=1)``, (B, 1 + C, H, W) with mask in {0, 1} and image in
    [-1, 1] -> patch logits (B, 1, h, w) (no sigmoid), h = H / 2**layers - 2 for H divisible by
    ``2**layers``; H must be at least ``3 * 2**layers``. Convolutions use 4x4 kernels, LeakyReLU
    (0.2) and GroupNorm; weights start from N(0, 0.02) as in pix2pix.
    """

    def __init__(self, *, in_channels: int, features: int = 32, layers: int = 3) -> None:
        if in_channels < 1 or features < 1 or layers < 1:
            raise ValueError(
                f"in_channels, features and layers must be >= 1, got {in_channels}, {features}, {layers}"
            )
        super().__init__(
            spatial_dims=2,
            channels=features,
            in_channels=1 + in_channels,
            out_channels=1,
            num_layers_d=layers,
            norm=("group", {"num_groups": norm_groups(2 * features)}),
        )
        self.image_channels = in_channels

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """(B, 1 + C, H, W) = cat(mask, image) -> patch logits (B, 1, h, w)."""
        if x.ndim != 4 or x.shape[1] != 1 + self.image_channels:
            raise ValueError(
                f"expected cat(mask, image) of shape (B, {1 + self.image_channels}, H, W), "
                f"got {tuple(x.shape)}"
            )
        for layer in self.children():
            x = layer(x)
        return x


def build_discriminator(*, in_channels: int, features: int, layers: int) -> ConditionalPatchDiscriminator:
    """Conditional PatchGAN for images of ``in_channels`` channels (input ``1 + in_channels``)."""
    disc = ConditionalPatchDiscriminator(in_channels=in_channels, features=features, layers=layers)
    logger.debug("discriminator: %d parameters", sum(p.numel() for p in disc.parameters()))
    return disc
