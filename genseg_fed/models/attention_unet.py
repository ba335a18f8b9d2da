"""A small 2D attention U-Net (Oktay et al. 2018) with GroupNorm and a selectable activation.

MONAI's ``AttentionUnet`` hard-codes ``BatchNorm`` (not allowed under Opacus) and ReLU/PReLU
activations, and up-samples with transposed convolutions (no native Opacus grad sampler). This
version keeps its structure (strided-conv encoder, additive attention gates on the skips) but is
built from MONAI ``Convolution`` blocks with GroupNorm, nearest x2 up-sampling + conv, and any
activation of ``genseg_fed.models.utils.ACTIVATIONS``.

Input (B, C, H, W), typically in [-1, 1]; output logits (B, out_channels, H, W). H and W must be
divisible by ``2 ** (len(features) - 1)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import Tensor, nn

from .utils import act_spec, norm_groups

__all__ = ["AttentionGate", "AttentionUNet"]


def _conv(c_in: int, c_out: int, act: str, *, kernel: int = 3, stride: int = 1) -> Convolution:
    """conv (no bias: the norm removes it) -> GroupNorm -> activation (MONAI ``Convolution``)."""
    return Convolution(
        2,
        c_in,
        c_out,
        strides=stride,
        kernel_size=kernel,
        act=act_spec(act),
        norm=("group", {"num_groups": norm_groups(c_out)}),
        adn_ordering="NDA",
        bias=False,
    )


def _double_conv(c_in: int, c_out: int, act: str, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(_conv(c_in, c_out, act, stride=stride), _conv(c_out, c_out, act))


class AttentionGate(nn.Module):
    """Additive attention gate: ``x * sigmoid(psi(act(GN(W_g g) + GN(W_x x))))``.

    ``g`` (gating signal, from the coarser decoder level) and ``x`` (encoder skip) are both
    (B, *, H, W) at the same resolution; returns x re-weighted by a (B, 1, H, W) map in (0, 1).
    """

    def __init__(self, c_gate: int, c_skip: int, c_inner: int, act: str) -> None:
        super().__init__()
        self.w_g = nn.Sequential(
            nn.Conv2d(c_gate, c_inner, 1, bias=False), nn.GroupNorm(norm_groups(c_inner), c_inner)
        )
        self.w_x = nn.Sequential(
            nn.Conv2d(c_skip, c_inner, 1, bias=False), nn.GroupNorm(norm_groups(c_inner), c_inner)
        )
        cls, kwargs = act_spec(act)
        self.act = cls(**kwargs)
        self.psi = nn.Conv2d(c_inner, 1, 1)

    def forward(self, g: Tensor, x: Tensor) -> Tensor:
        gate = torch.sigmoid(self.psi(self.act(self.w_g(g) + self.w_x(x))))
        return x * gate


class _UpBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, act: str) -> None:
        super().__init__()
        self.up = _conv(c_in, c_out, act)
        self.gate = AttentionGate(c_out, c_out, max(c_out // 2, 1), act)
        self.merge = _double_conv(2 * c_out, c_out, act)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        up = self.up(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.merge(torch.cat((self.gate(up, skip), up), dim=1))


class AttentionUNet(nn.Module):
    """Attention U-Net with ``len(features)`` resolution levels.

    Args:
        in_channels: image channels C.
        out_channels: output (logit) channels.
        features: widths per level, top first, e.g. (16, 32, 64, 128) (at least 2 levels).
        act: activation name (default ReLU, as in the paper).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int = 1,
        features: Sequence[int] = (16, 32, 64, 128),
        act: str = "relu",
    ) -> None:
        super().__init__()
        features = tuple(features)
        if len(features) < 2:
            raise ValueError(f"features needs at least 2 levels, got {features}")
        act_spec(act)
        self.levels = len(features)
        self.encoder = nn.ModuleList(
            _double_conv(features[i - 1] if i else in_channels, features[i], act, stride=2 if i else 1)
            for i in range(len(features))
        )
        self.decoder = nn.ModuleList(
            _UpBlock(features[i], features[i - 1], act) for i in reversed(range(1, len(features)))
        )
        self.head = nn.Conv2d(features[0], out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> logits (B, out_channels, H, W)."""
        skips = []
        for down in self.encoder:
            x = down(x)
            skips.append(x)
        x = skips.pop()
        for up in self.decoder:
            x = up(x, skips.pop())
        return self.head(x)
