"""Clipping and noise of each Gaussian mechanism, per-record gradients, Poisson sampling."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from genseg_fed.privacy.mechanisms import (
    RecordBatch,
    clip_and_noise,
    dp_sgd_update,
    make_dp_optimizer,
    per_record_gradients,
    sample_records,
)


def _dp_opt(param: nn.Parameter, *, sigma: float, clip: float, expected: float, seed: int = 0):
    opt = torch.optim.SGD([param], lr=1.0)
    return make_dp_optimizer(
        opt,
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=expected,
        generator=torch.Generator().manual_seed(seed),
    )


@pytest.mark.parametrize("norms", [[0.1, 0.5], [3.0, 10.0], [0.2, 7.0, 1.0]])
def test_dp_sgd_clips_every_record_gradient_to_the_norm(norms: list[float]) -> None:
    clip, dim = 1.0, 50
    torch.manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(len(norms), dim), dim=1)
    per_record = directions * torch.tensor(norms)[:, None]
    param = nn.Parameter(torch.zeros(dim))
    opt = _dp_opt(param, sigma=0.0, clip=clip, expected=len(norms))
    dp_sgd_update(opt, {param: per_record})
    # SGD lr=1 from 0: param = -(sum of clipped record gradients) / expected batch
    expected = sum(min(1.0, clip / n) * g for n, g in zip(norms, per_record, strict=True))
    torch.testing.assert_close(-param.detach() * len(norms), expected, rtol=1e-5, atol=1e-6)
    contributions = [min(1.0, clip / n) * n for n in norms]
    assert all(c <= clip + 1e-5 for c in contributions)


@pytest.mark.parametrize(("sigma", "clip"), [(1.0, 1.0), (2.5, 0.2)])
def test_dp_sgd_noise_std_is_noise_multiplier_times_clip(sigma: float, clip: float) -> None:
    dim, expected = 40_000, 4.0
    param = nn.Parameter(torch.zeros(dim))
    opt = _dp_opt(param, sigma=sigma, clip=clip, expected=expected, seed=1)
    dp_sgd_update(opt, {param: torch.zeros(3, dim)})  # zero gradients: only the noise moves it
    noise = -param.detach() * expected  # undo the mean over the expected batch
    assert noise.mean().abs() < 0.05 * sigma * clip
    assert noise.std().item() == pytest.approx(sigma * clip, rel=0.02)


def test_an_empty_update_still_adds_noise() -> None:
    param = nn.Parameter(torch.zeros(10_000))
    opt = _dp_opt(param, sigma=1.0, clip=1.0, expected=2.0)
    dp_sgd_update(opt, {param: torch.zeros(0, 10_000)})
    assert (param.detach() * 2).std().item() == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize(("norm", "clip"), [(0.05, 0.1), (5.0, 0.1), (1e3, 2.0)])
def test_level3_release_is_clipped_to_c(norm: float, clip: float) -> None:
    torch.manual_seed(0)
    grads = [torch.randn(3), torch.randn(2, 4)]
    total = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    grads = [g * norm / total for g in grads]
    out, before = clip_and_noise(grads, clip=clip, noise_multiplier=0.0, generator=torch.Generator())
    after = float(torch.sqrt(sum(g.pow(2).sum() for g in out)))
    assert before == pytest.approx(norm, rel=1e-5)
    assert after == pytest.approx(min(norm, clip), rel=1e-5)


@pytest.mark.parametrize(("sigma", "clip"), [(1.0, 0.5), (3.0, 0.01)])
def test_level3_noise_std_is_noise_multiplier_times_the_clip(sigma: float, clip: float) -> None:
    zeros = [torch.zeros(20_000), torch.zeros(100, 200)]
    out, _ = clip_and_noise(
        zeros, clip=clip, noise_multiplier=sigma, generator=torch.Generator().manual_seed(3)
    )
    noise = torch.cat([o.flatten() for o in out])
    assert noise.std().item() == pytest.approx(sigma * clip, rel=0.02)


def test_per_record_gradients_match_autograd_and_merge_a_records_rows() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    params = {n: p.detach() for n, p in net.named_parameters()}

    def row_loss(p, x, y):
        return (functional_call(net, p, (x[None],)) - y).pow(2).mean()

    x, y = torch.randn(5, 3), torch.randn(5, 1)
    # rows 0, 1 are record 0 (a patient with two slices); rows 2, 3, 4 are records 1, 2, 3
    batch = RecordBatch(torch.arange(5), torch.tensor([0, 0, 1, 2, 3]), 4)
    grads, losses = per_record_gradients(row_loss, params, [x, y], batch)
    assert losses.shape == (5,)
    for name, g in grads.items():
        assert g.shape == (4, *params[name].shape)

    def autograd(rows: list[int]) -> dict[str, torch.Tensor]:
        net.zero_grad()
        torch.stack([row_loss(dict(net.named_parameters()), x[r], y[r]) for r in rows]).mean().backward()
        return {n: p.grad.clone() for n, p in net.named_parameters()}

    for record, rows in enumerate([[0, 1], [2], [3], [4]]):
        ref = autograd(rows)
        for name in grads:
            torch.testing.assert_close(grads[name][record], ref[name], rtol=1e-5, atol=1e-6)


def test_fixed_size_sampling_without_replacement_is_uniform_over_records() -> None:
    records = [torch.tensor([2 * i, 2 * i + 1]) for i in range(10)]  # two rows per record (a patient)
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(10)
    for _ in range(2000):
        batch = sample_records(records, 3, gen)
        assert batch.n_records == 3 and batch.rows.numel() == 6, "always exactly B records, all their rows"
        picked = (batch.rows // 2).unique()
        assert picked.numel() == 3
        counts[picked] += 1
    assert torch.allclose(counts / 2000, torch.full((10,), 0.3), atol=0.03)
    assert sample_records(records, 50, gen).n_records == 10
