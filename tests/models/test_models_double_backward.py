"""The GenSeg hypergradient path: generator -> synthetic images -> one unrolled segmenter step
(``torch.func.functional_call``, ``create_graph=True``) -> validation loss -> generator alphas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from genseg_fed.models import SEGMENTERS, MaskToImageGenerator, build_segmenter

TINY = (8, 16, 32, 64)
INNER_LR = 0.1


def _data(size: int = 32, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(5)
    masks = (torch.rand(2, 1, size, size, generator=g) > 0.5).to(dtype)
    x_val = (torch.rand(2, 1, size, size, generator=g) * 2 - 1).to(dtype)
    y_val = (torch.rand(2, 1, size, size, generator=g) > 0.5).to(dtype)
    return masks, x_val, y_val


def _val_loss_after_one_step(
    seg: nn.Module, gen: nn.Module, masks: Tensor, x_val: Tensor, y_val: Tensor
) -> Tensor:
    params = dict(seg.named_parameters())
    x_syn = gen(masks)
    loss_train = F.binary_cross_entropy_with_logits(functional_call(seg, params, (x_syn,)), masks)
    grads = torch.autograd.grad(loss_train, list(params.values()), create_graph=True)
    updated = {n: p - INNER_LR * g for (n, p), g in zip(params.items(), grads, strict=True)}
    return F.binary_cross_entropy_with_logits(functional_call(seg, updated, (x_val,)), y_val)


@pytest.mark.parametrize("name", sorted(SEGMENTERS))
@pytest.mark.parametrize("act", [None, "gelu"])
def test_hypergradient_reaches_generator_alphas(name: str, act: str | None) -> None:
    torch.manual_seed(0)
    seg = build_segmenter(name, in_channels=1, image_size=32, features=TINY, act=act)
    gen = MaskToImageGenerator(out_channels=1, features=4, depth=2, ops=("conv3x3", "dil3x3"))
    before = {n: p.detach().clone() for n, p in seg.named_parameters()}
    loss_val = _val_loss_after_one_step(seg, gen, *_data())
    hyper = torch.autograd.grad(loss_val, gen.arch_parameters())
    assert len(hyper) == 2
    for h in hyper:
        assert torch.isfinite(h).all()
        assert h.abs().max() > 0
    for n, p in seg.named_parameters():  # functional_call left the module's own weights alone
        assert torch.equal(p, before[n])


def test_hypergradient_matches_finite_differences() -> None:
    """Smooth nets in float64: autograd's exact hypergradient equals central differences."""
    torch.manual_seed(0)
    seg = build_segmenter("unet", in_channels=1, image_size=32, features=(4, 8, 16), act="tanh").double()
    gen = MaskToImageGenerator(out_channels=1, features=4, depth=2, ops=("conv3x3", "conv5x5"), act="gelu")
    gen.double()
    data = _data(dtype=torch.float64)
    alphas = gen.arch_parameters()
    hyper = torch.autograd.grad(_val_loss_after_one_step(seg, gen, *data), alphas)
    direction = [torch.randn_like(a) for a in alphas]
    analytic = sum((h * d).sum() for h, d in zip(hyper, direction, strict=True))
    eps = 1e-4

    def shifted(sign: float) -> float:
        with torch.no_grad():
            for a, d in zip(alphas, direction, strict=True):
                a.add_(sign * eps * d)
        value = _val_loss_after_one_step(seg, gen, *data).item()
        with torch.no_grad():
            for a, d in zip(alphas, direction, strict=True):
                a.sub_(sign * eps * d)
        return value

    numeric = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
    assert abs(float(analytic)) > 1e-8
    assert abs(numeric - float(analytic)) <= 1e-5 * abs(float(analytic)) + 1e-10
