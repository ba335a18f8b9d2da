"""Networks of genseg-fed: segmenters, the mask -> image generator and the PatchGAN discriminator.

All networks are Opacus-compatible (no BatchNorm), device-agnostic, deterministic under
``torch.manual_seed``, free of state cached between calls, and differentiable twice through
``torch.func.functional_call`` (as GenSeg's unrolled hypergradient needs).

Tensor conventions: images (B, C, H, W) in [-1, 1]; masks (B, 1, H, W) in {0, 1}; segmenters
return logits (B, 1, H, W).
"""

from __future__ import annotations

from .attention_unet import AttentionUNet
from .discriminator import ConditionalPatchDiscriminator, build_discriminator
from .generator import OPS, MaskToImageGenerator, MixedOp, build_generator, generator_hyper_parameters
from .segmenters import SEGMENTERS, build_segmenter
from .utils import ACTIVATIONS, count_parameters, norm_parameter_names

__all__ = [
    "ACTIVATIONS",
    "OPS",
    "SEGMENTERS",
    "AttentionUNet",
    "ConditionalPatchDiscriminator",
    "MaskToImageGenerator",
    "MixedOp",
    "build_discriminator",
    "build_generator",
    "build_segmenter",
    "count_parameters",
    "generator_hyper_parameters",
    "norm_parameter_names",
]
