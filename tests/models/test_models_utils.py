"""Helpers: activation names, GroupNorm sizing, norm parameter discovery."""

from __future__ import annotations

import pytest
from torch import nn

from genseg_fed.models import ACTIVATIONS, norm_parameter_names
from genseg_fed.models.utils import act_spec, count_parameters, make_activation, norm_groups


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activations_are_fresh_and_not_in_place(name: str) -> None:
    a, b = make_activation(name), make_activation(name)
    assert a is not b and not getattr(a, "inplace", False)


def test_unknown_activation() -> None:
    with pytest.raises(ValueError, match=r"unknown activation 'swish'; choose one of .*'silu'"):
        act_spec("swish")


@pytest.mark.parametrize(("channels", "groups"), [(1, 1), (4, 4), (12, 6), (16, 8), (24, 8), (7, 7), (9, 3)])
def test_norm_groups(channels: int, groups: int) -> None:
    assert norm_groups(channels) == groups


def test_norm_parameter_names_kinds() -> None:
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.GroupNorm(2, 4),
        nn.InstanceNorm2d(4, affine=True),
        nn.InstanceNorm2d(4),  # no parameters
        nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 2)),
    )
    assert norm_parameter_names(net) == {"1.weight", "1.bias", "2.weight", "2.bias", "4.0.weight", "4.0.bias"}
    assert count_parameters(net) == 4 * 9 + 4 + 8 + 8 + 8 + 10
