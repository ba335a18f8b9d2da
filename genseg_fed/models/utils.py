"""Small helpers shared by the networks: activations, GroupNorm sizing, parameter bookkeeping."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = [
    "ACTIVATIONS",
    "NORM_TYPES",
    "act_spec",
    "count_parameters",
    "make_activation",
    "norm_groups",
    "norm_parameter_names",
]

# name -> (constructor, kwargs). The pair is also a valid MONAI layer spec, so the same names
# work for MONAI networks (``Convolution(act=act_spec("silu"))``) and for our own modules.
# None is in place: in-place activations break full backward hooks (Opacus) and can break
# double backward.
ACTIVATIONS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "relu": (nn.ReLU, {}),
    "leakyrelu": (nn.LeakyReLU, {"negative_slope": 0.2}),
    "prelu": (nn.PReLU, {}),
    "elu": (nn.ELU, {}),
    "gelu": (nn.GELU, {}),
    "silu": (nn.SiLU, {}),
    "tanh": (nn.Tanh, {}),
}

# Normalisation layers whose parameters FedBN-style training keeps on the site.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
)


def act_spec(name: str) -> tuple[type[nn.Module], dict[str, Any]]:
    """``(constructor, kwargs)`` of activation ``name``; ValueError listing valid names otherwise."""
    try:
        cls, kwargs = ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None
    return cls, dict(kwargs)


def make_activation(name: str) -> nn.Module:
    """A fresh (never in-place) activation module for ``name`` (see :data:`ACTIVATIONS`)."""
    cls, kwargs = act_spec(name)
    return cls(**kwargs)


def norm_groups(channels: int, max_groups: int = 8) -> int:
    """Largest number of GroupNorm groups <= ``max_groups`` that divides ``channels``."""
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


def norm_parameter_names(model: nn.Module) -> set[str]:
    """Names (as in ``model.named_parameters()``) of parameters owned by normalisation layers.

    Covers GroupNorm, InstanceNorm and LayerNorm (:data:`NORM_TYPES`); used for FedBN-style
    training where these parameters stay on the site. Norm layers without affine parameters
    contribute nothing.
    """
    names: set[str] = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            prefix = f"{mod_name}." if mod_name else ""
            names.update(prefix + p_name for p_name, _ in module.named_parameters(recurse=False))
    return names


def count_parameters(model: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of (trainable) scalar parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
