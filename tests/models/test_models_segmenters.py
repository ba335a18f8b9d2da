"""Segmenter registry: shapes, errors, Opacus compatibility, determinism (all tiny, 32 px)."""

from __future__ import annotations

import typing

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule, PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from genseg_fed.config import SegmenterName
from genseg_fed.models import SEGMENTERS, build_segmenter, norm_parameter_names

NAMES = sorted(SEGMENTERS)
TINY = (8, 16, 32, 64)
# Opacus per-layer hooks work for these; SwinUNETR needs whole-model torch.func (see below).
HOOKED = ["attention_unet", "unet"]

pytestmark = pytest.mark.filterwarnings(
    "ignore:Full backward hook is firing:UserWarning", "ignore:Secure RNG turned off:UserWarning"
)


def _tiny(name: str, channels: int = 1, act: str | None = None, size: int = 32) -> nn.Module:
    torch.manual_seed(0)
    return build_segmenter(name, in_channels=channels, image_size=size, features=TINY, act=act)


def _batch(n: int = 2, channels: int = 1, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, channels, size, size, generator=g) * 2 - 1
    y = (torch.rand(n, 1, size, size, generator=g) > 0.5).float()
    return x, y


def test_registry_keys_match_config_literal() -> None:
    assert set(SEGMENTERS) == set(typing.get_args(SegmenterName))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape_and_finite(name: str, channels: int) -> None:
    net = _tiny(name, channels)
    x, _ = _batch(channels=channels)
    out = net(x)
    assert out.shape == (2, 1, 32, 32)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_default_widths_at_64px_and_no_state_between_calls(name: str) -> None:
    torch.manual_seed(0)
    net = build_segmenter(name, in_channels=1, image_size=64)
    with torch.no_grad():
        big = net(_batch(1, size=64)[0])
        small = net(_batch(3, size=32)[0])  # other size and batch: nothing cached on the module
        again = net(_batch(1, size=64)[0])
    assert big.shape == (1, 1, 64, 64) and small.shape == (3, 1, 32, 32)
    torch.testing.assert_close(big, again)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown segmenter 'resnet'") as info:
        build_segmenter("resnet", in_channels=1, image_size=32)
    for name in NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize(("name", "size"), [("swin_unetr", 48), ("swin_unetr", 16), ("unet", 36)])
def test_bad_image_size_is_a_clear_error(name: str, size: int) -> None:
    with pytest.raises(ValueError, match="image_size divisible by"):
        build_segmenter(name, in_channels=1, image_size=size, features=TINY)


def test_bad_activation_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown activation 'swoosh'.*gelu"):
        build_segmenter("unet", in_channels=1, image_size=32, features=TINY, act="swoosh")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("act", [None, "gelu"])
def test_opacus_validator_finds_nothing(name: str, act: str | None) -> None:
    net = _tiny(name, act=act)
    assert ModuleValidator.validate(net, strict=True) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert not any(getattr(m, "inplace", False) for m in net.modules())


@pytest.mark.parametrize("name", NAMES)
def test_smooth_activation_replaces_the_kinked_ones(name: str) -> None:
    net = _tiny(name, act="silu")
    kinked = (nn.ReLU, nn.LeakyReLU, nn.PReLU)
    assert not any(isinstance(m, kinked) for m in net.modules())
    assert any(isinstance(m, nn.SiLU) for m in net.modules())


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_init(name: str) -> None:
    a, b = _tiny(name).state_dict(), _tiny(name).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_norm_parameters_found(name: str) -> None:
    net = _tiny(name)
    names = norm_parameter_names(net)
    assert names, "every segmenter has affine normalisation layers"
    params = dict(net.named_parameters())
    assert names <= params.keys()
    assert all(n.endswith(("weight", "bias")) for n in names)
    assert not any("conv.weight" in n and params[n].ndim == 4 for n in names)


def _loop_grads(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(x.shape[0]):
        loss = F.binary_cross_entropy_with_logits(net(x[i : i + 1]), y[i : i + 1], reduction="sum")
        names, params = zip(*[(n, p) for n, p in net.named_parameters() if p.requires_grad], strict=True)
        out.append(dict(zip(names, torch.autograd.grad(loss, params), strict=True)))
    return out


@pytest.mark.parametrize("name", HOOKED)
def test_opacus_hooks_give_exact_per_sample_grads(name: str) -> None:
    net = _tiny(name).double()
    x, y = (t.double() for t in _batch(3))
    gsm = GradSampleModule(net, loss_reduction="sum")
    F.binary_cross_entropy_with_logits(gsm(x), y, reduction="sum").backward()
    samples = {n: p.grad_sample.clone() for n, p in net.named_parameters()}
    gsm.disable_hooks()
    for i, ref in enumerate(_loop_grads(net, x, y)):
        for n, g in ref.items():
            assert samples[n].shape[0] == 3
            torch.testing.assert_close(samples[n][i], g, rtol=1e-7, atol=1e-9, msg=n)


@pytest.mark.parametrize("name", HOOKED)
def test_make_private_step(name: str) -> None:
    net = _tiny(name)
    x, y = _batch(4)
    before = [p.detach().clone() for p in net.parameters()]
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(
        module=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=2),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
    )
    for xb, yb in loader:
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(model(xb), yb).backward()
        opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters(), strict=True))
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_swin_unetr_opacus_hooks_are_unsupported() -> None:
    """WindowAttention owns a buffer (relative_position_index) and sees (B * windows, N, C)
    tensors, so Opacus' per-layer hooks (and its per-layer functorch fallback) cannot work."""
    with pytest.raises(NotImplementedError, match="buffers"):
        GradSampleModule(_tiny("swin_unetr"))


def _functorch_per_sample_grads(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    params = {n: p.detach() for n, p in net.named_parameters()}
    buffers = dict(net.named_buffers())

    def loss_one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits = functional_call(net, (p, buffers), (xi.unsqueeze(0),))
        return F.binary_cross_entropy_with_logits(logits, yi.unsqueeze(0), reduction="sum")

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)


def test_swin_unetr_whole_model_functorch_per_sample_grads() -> None:
    # float32: in float64 vmap(grad) of a CPU conv fails ("slow_conv2d: grad_weight must be contiguous")
    net = _tiny("swin_unetr")
    x, y = _batch(3)
    samples = _functorch_per_sample_grads(net, x, y)
    for i, ref in enumerate(_loop_grads(net, x, y)):
        scale = max(g.abs().max().item() for g in ref.values())
        for n, g in ref.items():
            torch.testing.assert_close(samples[n][i], g, rtol=1e-3, atol=1e-5 * scale, msg=n)


def test_swin_unetr_dp_step_with_no_op_grad_sample_mode() -> None:
    """What works for SwinUNETR: Opacus' ``no_op`` mode fed with torch.func per-sample grads."""
    net = _tiny("swin_unetr")
    x, y = _batch(4)
    before = [p.detach().clone() for p in net.parameters()]
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(
        module=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=2),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
        grad_sample_mode="no_op",
    )
    for xb, yb in loader:
        opt.zero_grad()
        samples = _functorch_per_sample_grads(net, xb, yb)
        for n, p in net.named_parameters():
            p.grad_sample = samples[n]
        opt.step()
    assert model._module is net
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters(), strict=True))
    assert engine.get_epsilon(delta=1e-5) > 0
