"""Conditional PatchGAN discriminator: shapes, errors, Opacus per-sample gradients."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from genseg_fed.models import build_discriminator, norm_parameter_names

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


@pytest.mark.parametrize(
    ("channels", "layers", "size", "patches"),
    [(1, 3, 64, 6), (3, 3, 64, 6), (1, 1, 32, 14), (3, 2, 32, 6), (1, 3, 32, 2)],
)
def test_patch_logits_shape(channels: int, layers: int, size: int, patches: int) -> None:
    torch.manual_seed(0)
    disc = build_discriminator(in_channels=channels, features=8, layers=layers)
    x = torch.randn(2, 1 + channels, size, size)
    out = disc(x)
    assert out.shape == (2, 1, patches, patches)
    assert patches == size // 2**layers - 2  # the documented formula
    assert torch.isfinite(out).all()


def test_wrong_input_channels() -> None:
    disc = build_discriminator(in_channels=3, features=8, layers=2)
    with pytest.raises(ValueError, match=r"cat\(mask, image\).*\(B, 4, H, W\)"):
        disc(torch.randn(2, 3, 32, 32))


def test_no_batchnorm_and_group_norms_found() -> None:
    disc = build_discriminator(in_channels=1, features=8, layers=3)
    assert ModuleValidator.validate(disc, strict=True) == []
    names = norm_parameter_names(disc)
    assert len(names) == 2 * 3  # weight + bias of each normalised layer


def test_opacus_per_sample_grads() -> None:
    torch.manual_seed(0)
    disc = build_discriminator(in_channels=3, features=8, layers=2).double()
    x = torch.randn(3, 4, 32, 32, dtype=torch.float64)
    gsm = GradSampleModule(disc, loss_reduction="sum")
    gsm(x).sum().backward()
    samples = {n: p.grad_sample.clone() for n, p in disc.named_parameters()}
    gsm.disable_hooks()
    for i in range(3):
        grads = torch.autograd.grad(disc(x[i : i + 1]).sum(), list(disc.parameters()))
        for (n, _), g in zip(disc.named_parameters(), grads, strict=True):
            torch.testing.assert_close(samples[n][i], g, rtol=1e-7, atol=1e-9, msg=n)
