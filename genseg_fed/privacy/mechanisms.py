"""The Gaussian mechanisms of private GenSeg: per-record gradients, DP-SGD updates, the level-III release.

* :func:`per_record_gradients` computes one gradient per *record* with ``torch.func``
  (``vmap(grad(functional_call))`` over rows, then the rows of one record averaged), so a record's
  real image and all synthetic images made from its mask form one gradient that is clipped as a
  whole.
* :func:`sample_records` draws a fixed-size sample of B records uniformly without replacement (the
  sampling the replace-one accountant analyses; a fixed B also keeps step times independent of the data).
* :func:`dp_sgd_update` hands those gradients to an Opacus :class:`~opacus.optimizers.DPOptimizer`
  as ``p.grad_sample``: Opacus clips each record's gradient to ``max_grad_norm``, sums, adds
  ``N(0, (noise_multiplier * max_grad_norm)^2)`` and divides by the batch size B.
* :func:`clip_and_noise` releases a whole update vector (the level-III hypergradient) clipped to
  norm C with ``N(0, (noise_multiplier * C)^2)`` noise; replacing any record moves a vector inside the
  C-ball by at most its diameter 2C, the sensitivity the accountant uses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

__all__ = [
    "RecordBatch",
    "clip_and_noise",
    "dp_sgd_update",
    "functional_loss",
    "make_dp_optimizer",
    "per_record_gradients",
    "sample_records",
]


@dataclass(frozen=True)
class RecordBatch:
    """Rows of the sampled records.

    rows: indices into the split's rows (images), shape (R,).
    record_of_row: for each row, the position of its record in this batch, shape (R,), values in
        ``[0, n_records)``.
    n_records: how many records were sampled.
    """

    rows: torch.Tensor
    record_of_row: torch.Tensor
    n_records: int


def sample_records(records: Sequence[torch.Tensor], size: int, generator: torch.Generator) -> RecordBatch:
    """``size`` distinct records drawn uniformly without replacement (all of them when ``size >= len``).

    Args:
        records: the row indices of each record (a record is a patient: all its images / slices).
        generator: the site's secret sampling stream.
    """
    n = len(records)
    chosen = [records[i] for i in torch.randperm(n, generator=generator)[: min(size, n)].tolist()]
    if not chosen:
        empty = torch.zeros(0, dtype=torch.long)
        return RecordBatch(empty, empty, 0)
    rows = torch.cat(chosen)
    owner = torch.cat([torch.full((len(r),), k, dtype=torch.long) for k, r in enumerate(chosen)])
    return RecordBatch(rows, owner, len(chosen))


def per_record_gradients(
    row_loss: Callable[..., torch.Tensor],
    params: Mapping[str, torch.Tensor],
    row_inputs: Sequence[torch.Tensor],
    batch: RecordBatch,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Gradient of each record's loss with respect to ``params``.

    Args:
        row_loss: ``row_loss(params, *row_input) -> scalar``, the loss of ONE row (no batch dim
            on the row's tensors), written with ``torch.func.functional_call``.
        params: the parameters to differentiate (detached tensors, by name).
        row_inputs: tensors whose first dimension indexes the rows of ``batch`` (length R).
        batch: which record each row belongs to.

    Returns ``({name: (n_records, *param.shape)}, row losses (R,))``. A record with several rows
    gets the mean of its rows' gradients (its loss is the mean of its rows' losses).
    """
    if batch.n_records == 0:
        grads = {n: p.new_zeros((0, *p.shape)) for n, p in params.items()}
        return grads, torch.zeros(0)
    fn = vmap(grad_and_value(row_loss), in_dims=(None, *[0] * len(row_inputs)), randomness="different")
    row_grads, losses = fn(dict(params), *row_inputs)
    if batch.rows.numel() == batch.n_records:  # one row per record (2-D images): nothing to merge
        return dict(row_grads), losses.detach()
    owner = batch.record_of_row.to(losses.device)
    counts = torch.zeros(batch.n_records, device=losses.device).index_add_(0, owner, torch.ones_like(losses))
    merged = {}
    for name, g in row_grads.items():
        total = g.new_zeros((batch.n_records, *g.shape[1:])).index_add_(0, owner, g)
        merged[name] = total / counts.view(-1, *[1] * (g.ndim - 1))
    return merged, losses.detach()


def functional_loss(
    module: nn.Module, frozen: Mapping[str, torch.Tensor] | None = None
) -> Callable[[Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor]:
    """``call(params, x) -> module(x)`` with ``params`` replacing some parameters (others frozen)."""
    buffers = dict(module.named_buffers())
    fixed = dict(frozen or {})

    def call(params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(module, {**fixed, **buffers, **params}, (x,))

    return call


def make_dp_optimizer(
    optimizer: torch.optim.Optimizer,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    generator: torch.Generator,
) -> DPOptimizer:
    """Wrap ``optimizer`` in Opacus' DP-SGD optimizer (mean over ``expected_batch_size``, here exactly B)."""
    return DPOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=generator,
    )


def dp_sgd_update(
    optimizer: DPOptimizer,
    per_record: Mapping[nn.Parameter, torch.Tensor],
    *,
    extra_grad: Callable[[], None] | None = None,
) -> None:
    """One DP-SGD step from per-record gradients.

    Every parameter of ``optimizer`` must appear in ``per_record`` with shape
    ``(n_records, *p.shape)``. Opacus clips each record's gradient (over all parameters together)
    to ``max_grad_norm``, sums, adds Gaussian noise of std ``noise_multiplier * max_grad_norm``
    and divides by the expected batch size; ``extra_grad`` then may add data-independent terms
    (FedProx) to ``p.grad`` before the wrapped optimizer steps.
    """
    optimizer.zero_grad(set_to_none=True)
    for p in optimizer.params:
        p.grad_sample = per_record[p].detach()
    optimizer.pre_step()
    if extra_grad is not None:
        extra_grad()
    optimizer.original_optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def clip_and_noise(
    grads: Sequence[torch.Tensor],
    *,
    clip: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> tuple[list[torch.Tensor], float]:
    """Clip the vector ``grads`` (all tensors together) to L2 norm ``clip``, add Gaussian noise.

    The noise std is ``noise_multiplier * clip`` (Opacus' convention); the accountant charges it for
    the replace-one sensitivity ``2 * clip``, the diameter of the ball the clipped vector lies in.

    Returns (noisy tensors, the norm before clipping).
    """
    norm = float(torch.sqrt(sum(g.detach().pow(2).sum() for g in grads)))
    factor = min(1.0, clip / (norm + 1e-12))
    std = noise_multiplier * clip
    out = []
    for g in grads:
        clipped = g.detach() * factor
        if std > 0:
            noise = torch.normal(0.0, std, size=g.shape, generator=generator, device=generator.device)
            clipped = clipped + noise.to(device=g.device, dtype=g.dtype)
        out.append(clipped)
    return out, norm
