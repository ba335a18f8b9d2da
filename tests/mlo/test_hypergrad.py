"""Level III: the exact hypergradient against central finite differences (float64, smooth nets)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from genseg_fed.mlo.hypergrad import fd_hypergradient, segmenter_hypergradient
from genseg_fed.mlo.losses import SegmentationLoss


class TinyGenerator(nn.Module):
    """Mask -> image with a softmax-mixed pair of convs: ``alpha`` plays the architecture weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(1, 2, 3, padding=1)
        self.conv_b = nn.Conv2d(1, 2, 5, padding=2)
        self.alpha = nn.Parameter(torch.tensor([0.3, -0.2]))
        self.out = nn.Conv2d(2, 1, 1)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(self.alpha, 0)
        return torch.tanh(self.out(torch.tanh(w[0] * self.conv_a(m) + w[1] * self.conv_b(m))))


def tiny_segmenter() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 1, 3, padding=1))


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    gen, seg = TinyGenerator().double(), tiny_segmenter().double()
    masks = (torch.rand(3, 1, 12, 12, dtype=torch.float64) > 0.5).double()
    real = torch.randn(2, 1, 12, 12, dtype=torch.float64)
    real_masks = (torch.rand(2, 1, 12, 12, dtype=torch.float64) > 0.5).double()
    val = torch.randn(2, 1, 12, 12, dtype=torch.float64)
    val_masks = (torch.rand(2, 1, 12, 12, dtype=torch.float64) > 0.5).double()
    return gen, seg, masks, real, real_masks, val, val_masks


def _unrolled_val_loss(gen, seg, masks, real, real_masks, val, val_masks, *, inner_lr, steps):
    """Reference: the level-III objective written out directly (no library code)."""
    loss_fn = SegmentationLoss()
    params = dict(seg.named_parameters())
    for _ in range(steps):
        x = torch.cat([real, gen(masks)])
        y = torch.cat([real_masks, masks])
        loss = loss_fn(functional_call(seg, params, (x,)), y)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        params = {n: p - inner_lr * g for (n, p), g in zip(params.items(), grads, strict=True)}
    return loss_fn(functional_call(seg, params, (val,)), val_masks)


@pytest.mark.parametrize("n_fixed", [0, 2])
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("which", ["alpha", "all"])
def test_hypergradient_matches_finite_differences(steps: int, which: str, n_fixed: int) -> None:
    gen, seg, masks, real, real_masks, val, val_masks = _problem()
    hyper = [gen.alpha] if which == "alpha" else list(gen.parameters())
    batches = [(torch.cat([real, gen(masks)]), torch.cat([real_masks, masks])) for _ in range(steps)]
    hg = segmenter_hypergradient(
        seg,
        SegmentationLoss(),
        train_batches=batches,
        val_images=val,
        val_masks=val_masks,
        hyper_params=hyper,
        inner_lr=0.5,
        n_fixed=n_fixed,
    )
    flat = torch.cat([g.flatten() for g in hg.grads])
    assert torch.isfinite(flat).all()
    assert flat.abs().max() > 1e-6, "the hypergradient must be non-zero for the parameters meant to learn"

    eps = 1e-6
    fd = []
    with torch.no_grad():
        for p in hyper:
            for i in range(p.numel()):
                orig = p.view(-1)[i].item()
                p.view(-1)[i] = orig + eps
                with torch.enable_grad():
                    up = _unrolled_val_loss(
                        gen, seg, masks, real, real_masks, val, val_masks, inner_lr=0.5, steps=steps
                    )
                p.view(-1)[i] = orig - eps
                with torch.enable_grad():
                    down = _unrolled_val_loss(
                        gen, seg, masks, real, real_masks, val, val_masks, inner_lr=0.5, steps=steps
                    )
                p.view(-1)[i] = orig
                fd.append((up - down).item() / (2 * eps))
    fd = torch.tensor(fd, dtype=torch.float64)
    torch.testing.assert_close(flat, fd, rtol=1e-5, atol=1e-8)


def test_detached_synthetic_images_are_refused() -> None:
    gen, seg, masks, real, real_masks, val, val_masks = _problem()
    batch = (torch.cat([real, gen(masks).detach()]), torch.cat([real_masks, masks]))
    with pytest.raises(ValueError, match="detached"):
        segmenter_hypergradient(
            seg,
            SegmentationLoss(),
            train_batches=[batch],
            val_images=val,
            val_masks=val_masks,
            hyper_params=[gen.alpha],
            inner_lr=0.1,
        )


@pytest.mark.parametrize("n_fixed", [0, 2])
def test_segmenter_weights_untouched_and_first_step_grads_match_plain_backward(n_fixed: int) -> None:
    gen, seg, masks, real, real_masks, val, val_masks = _problem()
    before = {n: p.detach().clone() for n, p in seg.named_parameters()}
    x, y = torch.cat([real, gen(masks)]), torch.cat([real_masks, masks])
    hg = segmenter_hypergradient(
        seg,
        SegmentationLoss(),
        train_batches=[(x, y)],
        val_images=val,
        val_masks=val_masks,
        hyper_params=[gen.alpha],
        inner_lr=0.1,
        n_fixed=n_fixed,
    )
    for n, p in seg.named_parameters():
        torch.testing.assert_close(p.detach(), before[n])
    seg.zero_grad()
    SegmentationLoss()(seg(x.detach()), y).backward()
    for n, p in seg.named_parameters():
        torch.testing.assert_close(hg.first_step_grads[n], p.grad)


# ------------------------------------------------------------------ finite-difference (DARTS) estimator


def _fd_against_exact(which: str, inner_lr: float, seed: int) -> float:
    gen, seg, masks, real, real_masks, val, val_masks = _problem(seed)
    hyper = [gen.alpha] if which == "alpha" else list(gen.parameters())
    loss_fn = SegmentationLoss()
    syn = gen(masks)
    x, y = torch.cat([real, syn]), torch.cat([real_masks, masks])
    exact = segmenter_hypergradient(
        seg,
        loss_fn,
        train_batches=[(x, y)],
        val_images=val,
        val_masks=val_masks,
        hyper_params=hyper,
        inner_lr=inner_lr,
    )
    syn = gen(masks)  # a fresh graph: the exact computation freed the first one
    params = dict(seg.named_parameters())
    loss = loss_fn(seg(x.detach()), y)
    train_grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    share = syn.shape[0] / x.shape[0]

    def hyper_grad_at(p: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        syn_loss = share * loss_fn(functional_call(seg, p, (syn,)), masks)
        return list(torch.autograd.grad(syn_loss, hyper, retain_graph=True))

    fd = fd_hypergradient(
        seg,
        loss_fn,
        train_grads=train_grads,
        val_images=val,
        val_masks=val_masks,
        inner_lr=inner_lr,
        hyper_grad_at=hyper_grad_at,
    )
    for n, p in seg.named_parameters():  # the estimator never moves the segmenter
        assert torch.equal(p, params[n])
    a = torch.cat([g.flatten() for g in exact.grads])
    b = torch.cat([g.flatten() for g in fd.grads])
    assert abs(fd.val_loss - exact.val_loss) < 1e-12
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("which", ["alpha", "all"])
def test_fd_hypergradient_points_where_the_exact_one_does(which: str, seed: int) -> None:
    """DARTS' estimator drops only the curvature of the unrolled step: cosine > 0.9 to the exact value."""
    assert _fd_against_exact(which, inner_lr=0.1, seed=seed) > 0.9


def test_fd_hypergradient_becomes_exact_for_small_steps() -> None:
    """For one unrolled step the approximation error is O(inner_lr^2): tiny steps match almost exactly."""
    assert _fd_against_exact("all", inner_lr=1e-3, seed=0) > 0.999
