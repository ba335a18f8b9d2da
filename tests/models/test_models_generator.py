"""MaskToImageGenerator: shapes, range, alphas, hyper-parameter subsets, Opacus behaviour."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from genseg_fed.config import ModelConfig
from genseg_fed.models import (
    OPS,
    MaskToImageGenerator,
    MixedOp,
    build_generator,
    build_segmenter,
    count_parameters,
    generator_hyper_parameters,
    norm_parameter_names,
)

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


def _tiny(channels: int = 1, **kw: object) -> MaskToImageGenerator:
    torch.manual_seed(0)
    args = {"out_channels": channels, "features": 4, "depth": 2, "ops": ("conv3x3", "sep3x3")} | kw
    return MaskToImageGenerator(**args)  # type: ignore[arg-type]


def _masks(n: int = 2, size: int = 32) -> torch.Tensor:
    return (torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(3)) > 0.5).float()


@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape_and_range(channels: int) -> None:
    out = _tiny(channels)(_masks())
    assert out.shape == (2, channels, 32, 32)
    assert torch.isfinite(out).all()
    assert out.min() >= -1 and out.max() <= 1
    assert out.std() > 0


def test_config_defaults_build_a_generator_smaller_than_the_segmenter() -> None:
    """Its cost is paid at every pre-training step and pool render: keep it below the segmenter's size."""
    cfg = ModelConfig()
    gen = build_generator(out_channels=3, features=cfg.gen_features, depth=cfg.gen_depth, ops=cfg.gen_ops)
    seg = build_segmenter(cfg.segmenter, in_channels=3, image_size=64, features=cfg.seg_features)
    assert 100_000 <= count_parameters(gen) < count_parameters(seg)
    with torch.no_grad():
        assert gen(_masks(1, 64)).shape == (1, 3, 64, 64)


@pytest.mark.parametrize("op", sorted(OPS))
def test_every_op_keeps_the_shape(op: str) -> None:
    gen = _tiny(ops=(op,))
    assert gen(_masks()).shape == (2, 1, 32, 32)


def test_alphas_start_uniform_and_are_named_alpha() -> None:
    gen = _tiny(depth=3, ops=("conv3x3", "conv5x5", "dil3x3"))
    alphas = gen.arch_parameters()
    assert len(alphas) == 3  # one MixedOp per level: bottleneck + 2 decoder blocks
    assert all(a.shape == (3,) and torch.equal(a, torch.zeros(3)) for a in alphas)
    named = [n for n, p in gen.named_parameters() if any(p is a for a in alphas)]
    assert len(named) == 3 and all("alpha" in n for n in named)
    mixed = next(m for m in gen.modules() if isinstance(m, MixedOp))
    torch.testing.assert_close(mixed.weights(), torch.full((3,), 1 / 3))


def test_alpha_changes_the_output() -> None:
    gen = _tiny()
    masks = _masks()
    with torch.no_grad():
        before = gen(masks)
        gen.arch_parameters()[0].copy_(torch.tensor([5.0, -5.0]))
        after = gen(masks)
    assert not torch.allclose(before, after)


def test_unknown_op_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown generator op\(s\) \['conv7x7'\].*sep3x3"):
        _tiny(ops=("conv3x3", "conv7x7"))
    with pytest.raises(ValueError, match="at least one"):
        _tiny(ops=())
    with pytest.raises(ValueError, match="unknown activation"):
        _tiny(act="swoosh")


def test_bad_mask_shapes() -> None:
    gen = _tiny()
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        gen(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="divisible by 2\\*\\*depth"):
        gen(torch.zeros(2, 1, 30, 30))


def test_hyper_parameter_subsets() -> None:
    gen = _tiny(depth=3)
    named = dict(gen.named_parameters())
    arch = generator_hyper_parameters(gen, "arch")
    assert set(arch) == {n for n in named if "alpha" in n} and len(arch) == 3
    assert all(arch[n] is named[n] for n in arch)
    decoder = generator_hyper_parameters(gen, "decoder")
    assert set(arch) < set(decoder)
    assert not any(n.startswith("encoder.") for n in decoder)
    assert any(n.startswith("head.") for n in decoder) and any(n.startswith("bottleneck.") for n in decoder)
    assert all(decoder[n] is named[n] for n in decoder)
    everything = generator_hyper_parameters(gen, "all")
    assert everything.keys() == named.keys() and set(decoder) < set(everything)


def test_hyper_parameter_subset_bad_name() -> None:
    with pytest.raises(ValueError, match=r"unknown hyper-parameter subset 'alphas'.*'arch'"):
        generator_hyper_parameters(_tiny(), "alphas")


def test_norm_parameter_names_are_the_groupnorm_affines() -> None:
    gen = _tiny()
    expected = {
        f"{mod_name}.{p}"
        for mod_name, m in gen.named_modules()
        if isinstance(m, nn.GroupNorm)
        for p in ("weight", "bias")
    }
    assert expected and norm_parameter_names(gen) == expected


def test_deterministic_init_and_dropout_only_in_training() -> None:
    a, b = _tiny(dropout=0.5), _tiny(dropout=0.5)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb)
    masks = _masks()
    a.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(masks), a(masks))
    assert any(isinstance(m, nn.Dropout) for m in a.modules())


def test_opacus_validator_and_per_sample_grads_including_alphas() -> None:
    gen = _tiny(3)
    assert ModuleValidator.validate(gen, strict=True) == []
    gen.double()
    masks = _masks(3).double()
    gsm = GradSampleModule(gen, loss_reduction="sum")
    gsm(masks).pow(2).sum().backward()
    samples = {n: p.grad_sample.clone() for n, p in gen.named_parameters()}
    gsm.disable_hooks()
    # MixedOp owns alpha directly, so Opacus' functorch fallback differentiates the whole MixedOp
    assert all(samples[n].shape == (3, *p.shape) for n, p in gen.named_parameters())
    for i in range(3):
        grads = torch.autograd.grad(gen(masks[i : i + 1]).pow(2).sum(), list(gen.parameters()))
        for (n, _), g in zip(gen.named_parameters(), grads, strict=True):
            torch.testing.assert_close(samples[n][i], g, rtol=1e-7, atol=1e-9, msg=n)


def test_opacus_with_frozen_alphas_hooks_the_convolutions() -> None:
    gen = _tiny()
    for a in gen.arch_parameters():
        a.requires_grad_(False)
    gsm = GradSampleModule(gen)
    gsm(_masks(3)).sum().backward()
    for n, p in gen.named_parameters():
        assert (getattr(p, "grad_sample", None) is not None) == p.requires_grad, n
