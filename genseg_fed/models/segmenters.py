"""Segmentation networks behind one registry (``SEGMENTERS``) and ``build_segmenter``.

Every segmenter maps images (B, C, H, W), intensities in [-1, 1], to foreground *logits*
(B, 1, H, W) (apply a sigmoid for probabilities). None uses BatchNorm (Opacus-compatible):

* ``"unet"``: MONAI ``UNet``, 2D, two residual units per level, affine InstanceNorm, PReLU by
  default.
* ``"attention_unet"``: our :class:`~genseg_fed.models.attention_unet.AttentionUNet`
  (MONAI's ``AttentionUnet`` hard-codes BatchNorm), GroupNorm, ReLU by default.
* ``"swin_unetr"``: MONAI ``SwinUNETR``, ``spatial_dims=2``, ``feature_size`` a multiple of 12
  derived from ``features[0]``, GroupNorm in the convolutional parts (LayerNorm in the
  transformer), window 8; H and W must be divisible by 32.

``act`` swaps the activation (e.g. a smooth ``"gelu"``/``"silu"``/``"tanh"`` for gradient checks).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from monai.networks.blocks import MLPBlock, UnetResBlock
from monai.networks.nets import SwinUNETR, UNet
from monai.utils import optional_import
from torch import nn

from .attention_unet import AttentionUNet
from .utils import act_spec, make_activation, norm_groups

__all__ = ["SEGMENTERS", "build_attention_unet", "build_segmenter", "build_swin_unetr", "build_unet"]

logger = logging.getLogger(__name__)


def _check_features(features: Sequence[int]) -> tuple[int, ...]:
    features = tuple(int(f) for f in features)
    if len(features) < 2 or any(f < 1 for f in features):
        raise ValueError(f"features must list >= 2 positive widths, got {features}")
    return features


def _check_divisible(name: str, image_size: int, factor: int) -> None:
    if image_size < factor or image_size % factor:
        raise ValueError(f"segmenter {name!r} needs image_size divisible by {factor}, got {image_size}")


def build_unet(
    *, in_channels: int, image_size: int, features: Sequence[int] = (16, 32, 64, 128), act: str | None = None
) -> nn.Module:
    """MONAI ``UNet`` (2D): ``channels=features``, stride 2 between levels, 2 residual units,
    affine InstanceNorm, PReLU unless ``act`` is given.

    InstanceNorm rather than GroupNorm because MONAI applies one norm spec to every layer,
    including the top up-sampling convolution whose output has a single channel.
    """
    features = _check_features(features)
    _check_divisible("unet", image_size, 2 ** (len(features) - 1))
    return UNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=1,
        channels=features,
        strides=(2,) * (len(features) - 1),
        num_res_units=2,
        act=act_spec(act) if act is not None else "PRELU",
        norm=("instance", {"affine": True}),
    )


def build_attention_unet(
    *, in_channels: int, image_size: int, features: Sequence[int] = (16, 32, 64, 128), act: str | None = None
) -> nn.Module:
    """Our GroupNorm :class:`AttentionUNet` with widths ``features``; ReLU unless ``act`` is given."""
    features = _check_features(features)
    _check_divisible("attention_unet", image_size, 2 ** (len(features) - 1))
    return AttentionUNet(in_channels=in_channels, out_channels=1, features=features, act=act or "relu")


def build_swin_unetr(
    *, in_channels: int, image_size: int, features: Sequence[int] = (16, 32, 64, 128), act: str | None = None
) -> nn.Module:
    """MONAI ``SwinUNETR`` (2D) with ``feature_size = 12 * max(1, round(features[0] / 12))``.

    Window size 8 (no padding for power-of-two sizes), GroupNorm in the convolutional blocks.
    MONAI's LeakyReLUs there are in-place; they are made out-of-place (same maths) so that
    backward hooks and double backward are safe. With ``act`` those LeakyReLUs and the
    transformer MLPs' GELUs are replaced by ``act``.
    """
    features = _check_features(features)
    _check_divisible("swin_unetr", image_size, 32)
    if not optional_import("einops")[1]:  # MONAI's SwinUNETR needs it, but only fails at forward
        raise ImportError("segmenter 'swin_unetr' needs the 'einops' package: pip install einops")
    feature_size = 12 * max(1, round(features[0] / 12))
    net = SwinUNETR(
        in_channels=in_channels,
        out_channels=1,
        feature_size=feature_size,
        spatial_dims=2,
        window_size=8,
        norm_name=("group", {"num_groups": norm_groups(feature_size)}),
    )
    if act is not None:
        act_spec(act)
        for module in net.modules():
            if isinstance(module, UnetResBlock):
                module.lrelu = make_activation(act)
            elif isinstance(module, MLPBlock):
                module.fn = make_activation(act)
    for module in net.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    return net


SEGMENTERS: dict[str, Callable[..., nn.Module]] = {
    "unet": build_unet,
    "attention_unet": build_attention_unet,
    "swin_unetr": build_swin_unetr,
}


def build_segmenter(
    name: str,
    *,
    in_channels: int,
    image_size: int,
    features: Sequence[int] = (16, 32, 64, 128),
    act: str | None = None,
) -> nn.Module:
    """Segmenter ``name`` (a key of :data:`SEGMENTERS`): (B, in_channels, H, W) in [-1, 1] ->
    logits (B, 1, H, W), with H = W = ``image_size``.

    ``features``: widths per resolution level (``ModelConfig.seg_features``); ``act``: activation
    name (``genseg_fed.models.utils.ACTIVATIONS``), None for each network's usual one.
    Raises ValueError for an unknown name (listing valid ones) or an unsupported image size.
    """
    try:
        builder = SEGMENTERS[name]
    except KeyError:
        raise ValueError(f"unknown segmenter {name!r}; choose one of {sorted(SEGMENTERS)}") from None
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    net = builder(in_channels=in_channels, image_size=image_size, features=features, act=act)
    logger.debug("segmenter %s: %d parameters", name, sum(p.numel() for p in net.parameters()))
    return net
