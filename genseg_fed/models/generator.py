"""Mask -> image generator with searchable decoder operations (GenSeg level I/III network).

A pix2pix-style U-Net: a stride-2 convolutional encoder, a searchable bottleneck, and a
decoder whose blocks up-sample (nearest x2 followed by convolution, which avoids checkerboard
artefacts), concatenate the encoder skip and apply a :class:`MixedOp`: a
``softmax(alpha)``-weighted sum of candidate operations (DARTS-style). The ``alpha`` vectors are
the *architecture weights* that GenSeg's level III updates with the hypergradient of the
segmenter's validation loss.

Layout (``w_i = min(F * 2**i, 8 * F)``, D = depth)::

    masks (B, 1, H, W) in {0, 1}, mapped to [-1, 1]
      encoder    D x [conv4x4 stride 2 -> GN -> act]       level i: (B, w_i, H/2^(i+1), W/2^(i+1))
      bottleneck MixedOp -> dropout                        (B, w_{D-1}, H/2^D, W/2^D)
      decoder    D-1 x [up x2 -> cat(skip) -> conv1x1 -> GN -> act -> MixedOp (-> dropout)]
      head       up x2 -> cat(mask) -> conv3x3 -> tanh     (B, C, H, W) in [-1, 1]

Like pix2pix, no feature map is kept at full resolution (the head sees the input mask again for
crisp edges), which keeps the network cheap: D MixedOps in all, one per level below full size.
H and W must be divisible by ``2**depth``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .utils import make_activation, norm_groups

__all__ = [
    "OPS",
    "MaskToImageGenerator",
    "MixedOp",
    "build_generator",
    "generator_hyper_parameters",
]

logger = logging.getLogger(__name__)


def _conv_op(kernel: int, dilation: int = 1) -> Callable[[int], nn.Module]:
    def make(channels: int) -> nn.Module:
        pad = dilation * (kernel - 1) // 2
        return nn.Conv2d(channels, channels, kernel, padding=pad, dilation=dilation, bias=False)

    return make


def _sep_op(kernel: int) -> Callable[[int], nn.Module]:
    def make(channels: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=False),
            nn.Conv2d(channels, channels, 1, bias=False),
        )

    return make


# Candidate operations of a MixedOp: name -> factory(channels) of a shape-preserving conv.
# Each candidate is followed by its own GroupNorm + activation inside the MixedOp, so the
# mixture is not collapsible into a single linear operator and alpha has a real choice to make.
OPS: dict[str, Callable[[int], nn.Module]] = {
    "conv1x1": _conv_op(1),
    "conv3x3": _conv_op(3),
    "conv5x5": _conv_op(5),
    "dil3x3": _conv_op(3, dilation=2),
    "dil5x5": _conv_op(5, dilation=2),
    "sep3x3": _sep_op(3),
    "sep5x5": _sep_op(5),
}


def _check_ops(ops: Sequence[str]) -> tuple[str, ...]:
    ops = tuple(ops)
    if not ops:
        raise ValueError(f"ops must name at least one candidate operation; choose from {sorted(OPS)}")
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise ValueError(f"unknown generator op(s) {unknown}; choose from {sorted(OPS)}")
    if len(set(ops)) != len(ops):
        raise ValueError(f"generator ops must be distinct, got {list(ops)}")
    return ops


class MixedOp(nn.Module):
    """``sum_k softmax(alpha)_k * act(GN(op_k(x)))`` over the candidate ``ops``.

    Input and output: (B, channels, H, W). ``alpha`` (shape ``(len(ops),)``) starts at zero,
    i.e. a uniform mixture. Stateless between calls; no in-place operations (safe for
    ``torch.func.functional_call`` and double backward).
    """

    def __init__(self, channels: int, ops: Sequence[str], act: str) -> None:
        super().__init__()
        self.op_names = _check_ops(ops)
        self.ops = nn.ModuleList(
            nn.Sequential(
                OPS[name](channels), nn.GroupNorm(norm_groups(channels), channels), make_activation(act)
            )
            for name in self.op_names
        )
        self.alpha = nn.Parameter(torch.zeros(len(self.op_names)))

    def weights(self) -> Tensor:
        """Mixing weights ``softmax(alpha)``, shape ``(len(ops),)``, summing to 1."""
        return torch.softmax(self.alpha, dim=0)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weights()
        out = w[0] * self.ops[0](x)
        for k in range(1, len(self.ops)):
            out = out + w[k] * self.ops[k](x)
        return out

    def extra_repr(self) -> str:
        return f"ops={list(self.op_names)}"


def _conv_block(c_in: int, c_out: int, act: str, *, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    pad = (kernel - 1) // 2 if stride == 1 else (kernel - stride) // 2
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=pad, bias=False),
        nn.GroupNorm(norm_groups(c_out), c_out),
        make_activation(act),
    )


class _DecoderBlock(nn.Module):
    """Up-sample x2 (nearest), concatenate the skip, fuse (conv1x1), then the searchable MixedOp."""

    def __init__(
        self, c_in: int, c_skip: int, c_out: int, ops: Sequence[str], act: str, dropout: float
    ) -> None:
        super().__init__()
        self.fuse = _conv_block(c_in + c_skip, c_out, act, kernel=1)
        self.mixed = MixedOp(c_out, ops, act)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = self.fuse(torch.cat((x, skip), dim=1))
        return self.dropout(self.mixed(x))


class _Bottleneck(nn.Module):
    """The searchable block at the coarsest level: MixedOp, then dropout."""

    def __init__(self, channels: int, ops: Sequence[str], act: str, dropout: float) -> None:
        super().__init__()
        self.mixed = MixedOp(channels, ops, act)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.mixed(x))


class MaskToImageGenerator(nn.Module):
    """pix2pix-style U-Net mapping a binary mask to an image, with searchable ops.

    Args:
        out_channels: image channels C (1 or 3).
        features: width F of the first (H/2) level; level i has ``min(F * 2**i, 8 * F)``.
        depth: number of stride-2 down-sampling steps (>= 1); H and W must be divisible by
            ``2**depth``. There is one :class:`MixedOp` per level: ``depth`` in all.
        ops: candidate operations of every :class:`MixedOp` (keys of :data:`OPS`).
        act: activation name (see ``genseg_fed.models.utils.ACTIVATIONS``).
        dropout: dropout after the bottleneck and every decoder block except the last
            (pix2pix's noise source); 0 disables it.

    ``forward``: masks (B, 1, H, W) with values in {0, 1} (float) -> images (B, C, H, W) in
    [-1, 1] (tanh).
    """

    def __init__(
        self,
        *,
        out_channels: int,
        features: int = 32,
        depth: int = 3,
        ops: Sequence[str] = ("conv3x3", "conv5x5", "dil3x3"),
        act: str = "leakyrelu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if out_channels < 1:
            raise ValueError(f"out_channels must be >= 1, got {out_channels}")
        if features < 1 or depth < 1:
            raise ValueError(f"features and depth must be >= 1, got features={features}, depth={depth}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        _check_ops(ops)
        make_activation(act)  # validates the name
        self.out_channels = out_channels
        self.depth = depth
        widths = [min(features * 2**i, 8 * features) for i in range(depth)]

        self.encoder = nn.ModuleList(
            _conv_block(widths[i - 1] if i else 1, widths[i], act, kernel=4, stride=2) for i in range(depth)
        )
        self.bottleneck = _Bottleneck(widths[-1], ops, act, dropout)
        self.decoder = nn.ModuleList(
            _DecoderBlock(widths[i + 1], widths[i], widths[i], ops, act, dropout if i > 0 else 0.0)
            for i in reversed(range(depth - 1))
        )
        self.head = nn.Conv2d(widths[0] + 1, out_channels, 3, padding=1)

    def forward(self, masks: Tensor) -> Tensor:
        """(B, 1, H, W) masks in {0, 1} -> (B, out_channels, H, W) images in [-1, 1]."""
        if masks.ndim != 4 or masks.shape[1] != 1:
            raise ValueError(f"masks must be (B, 1, H, W), got {tuple(masks.shape)}")
        step = 2**self.depth
        if masks.shape[-2] % step or masks.shape[-1] % step:
            raise ValueError(
                f"mask height/width {tuple(masks.shape[-2:])} must be divisible by 2**depth = {step}"
            )
        m = masks * 2.0 - 1.0
        x = m
        skips = []
        for down in self.encoder:
            x = down(x)
            skips.append(x)
        x = self.bottleneck(skips.pop())
        for up in self.decoder:
            x = up(x, skips.pop())
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return torch.tanh(self.head(torch.cat((x, m), dim=1)))

    def arch_parameters(self) -> list[nn.Parameter]:
        """The architecture (mixing) weights: one ``alpha`` per MixedOp, coarsest level first."""
        return [m.alpha for m in self.modules() if isinstance(m, MixedOp)]


def generator_hyper_parameters(gen: MaskToImageGenerator, which: str) -> dict[str, nn.Parameter]:
    """The generator parameters that GenSeg level III updates, as ``{name: parameter}``.

    Names are those of ``gen.named_parameters()`` (usable with ``torch.func.functional_call``).

    * ``"arch"``: only the MixedOp ``alpha`` vectors (the paper's architecture weights);
    * ``"decoder"``: everything after the encoder: bottleneck, decoder blocks and head
      (all alphas included);
    * ``"all"``: every parameter.
    """
    named = dict(gen.named_parameters())
    if which == "arch":
        arch = {id(p) for p in gen.arch_parameters()}
        return {n: p for n, p in named.items() if id(p) in arch}
    if which == "decoder":
        return {n: p for n, p in named.items() if not n.startswith("encoder.")}
    if which == "all":
        return named
    raise ValueError(f"unknown hyper-parameter subset {which!r}; choose one of ['all', 'arch', 'decoder']")


def build_generator(
    *,
    out_channels: int,
    features: int,
    depth: int,
    ops: Sequence[str],
    act: str = "leakyrelu",
    dropout: float = 0.0,
) -> MaskToImageGenerator:
    """A :class:`MaskToImageGenerator` from the ``ModelConfig`` fields (``gen_*``)."""
    gen = MaskToImageGenerator(
        out_channels=out_channels, features=features, depth=depth, ops=ops, act=act, dropout=dropout
    )
    logger.debug(
        "generator: %d parameters, %d architecture weights",
        sum(p.numel() for p in gen.parameters()),
        sum(p.numel() for p in gen.arch_parameters()),
    )
    return gen
