"""Level III of GenSeg: the exact hypergradient of the validation loss w.r.t. generator parameters.

The segmenter's weights after ``k`` unrolled SGD steps on (partly synthetic) training batches are
a differentiable function of the generator parameters ``a`` that made the synthetic images::

    theta_0     = theta
    theta_{j+1} = theta_j - inner_lr * grad_theta L_train(theta_j; batch_j(a))
    h(a)        = L_val(theta_k)

``segmenter_hypergradient`` returns ``dh/da`` exactly (second-order autograd through the unrolled
steps, no finite differences). The synthetic images in ``batch_j`` must still be attached to the
generator's graph; detaching them silently gives a zero hypergradient, so that is checked.

``fd_hypergradient`` is DARTS' second-order approximation for one unrolled step (Liu et al., 2019,
eq. 8): with ``theta' = theta - lr * g``, ``v = grad_theta' L_val(theta')`` and ``theta+- = theta +- eps v``::

    dh/da ~= -lr * (grad_a L_train(theta+, a) - grad_a L_train(theta-, a)) / (2 eps),   eps = r / |v|

It needs no double backward: one validation gradient and two first-order gradients w.r.t. ``a``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["FD_RADIUS", "HyperGradient", "fd_hypergradient", "segmenter_hypergradient"]

FD_RADIUS = 0.01  # DARTS: eps = 0.01 / |v|

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# segmenter parameters (name -> tensor) -> gradient of the training loss w.r.t. each hyper-parameter
HyperGradAt = Callable[[dict[str, torch.Tensor]], Sequence[torch.Tensor]]


@dataclass(frozen=True)
class HyperGradient:
    """Result of one level-III computation.

    grads: d L_val / d a, one tensor per hyper-parameter (zeros where a parameter is unused).
    val_loss: L_val(theta_k) as a float.
    train_loss: L_train of the first unrolled step (at the current weights) as a float.
    first_step_grads: the (detached) segmenter gradient of the first unrolled step, name -> grad.
        It equals the level-II gradient on the same batch, so the trainer can reuse it.
    """

    grads: tuple[torch.Tensor, ...]
    val_loss: float
    train_loss: float
    first_step_grads: dict[str, torch.Tensor]


def segmenter_hypergradient(
    segmenter: nn.Module,
    loss_fn: LossFn,
    *,
    train_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    val_images: torch.Tensor,
    val_masks: torch.Tensor,
    hyper_params: Sequence[torch.Tensor],
    inner_lr: float,
    n_fixed: int = 0,
) -> HyperGradient:
    """Exact hypergradient of the validation loss through ``len(train_batches)`` unrolled steps.

    Args:
        segmenter: the segmenter; its current parameters are ``theta`` (not modified).
        loss_fn: segmentation loss ``(logits, masks) -> scalar``.
        train_batches: one ``(images (B,C,H,W), masks (B,1,H,W))`` pair per unrolled step; the
            synthetic images among them must depend on ``hyper_params`` (not detached).
        val_images, val_masks: the site's validation split, (V,C,H,W) and (V,1,H,W).
        hyper_params: generator tensors to differentiate w.r.t. (``requires_grad=True``).
        inner_lr: learning rate of the unrolled SGD steps.
        n_fixed: the first ``n_fixed`` rows of the first batch (the real pairs) do not depend on
            ``hyper_params``. Their gradient at the current weights is a constant w.r.t. the hyper-
            parameters, so it is computed without a second-order graph; only the synthetic rows pay
            for double backward. This is exact provided ``loss_fn`` is a mean of per-sample losses
            (as :class:`~genseg_fed.mlo.losses.SegmentationLoss` is). Later unrolled steps start
            from weights that depend on the hyper-parameters, so they are never split.
    """
    if not train_batches:
        raise ValueError("train_batches must hold at least one batch (one per unrolled step)")
    if not any(images.requires_grad for images, _ in train_batches):
        raise ValueError(
            "no training batch is attached to the generator's graph: synthetic images must not be "
            "detached on the level-III path"
        )
    names = [n for n, p in segmenter.named_parameters() if p.requires_grad]
    params = {n: p for n, p in segmenter.named_parameters() if p.requires_grad}
    buffers = dict(segmenter.named_buffers())

    first_step_grads: dict[str, torch.Tensor] = {}
    train_loss = float("nan")
    for step, (images, masks) in enumerate(train_batches):
        if step == 0 and 0 < n_fixed < images.shape[0]:
            loss, grads = _split_gradient(segmenter, loss_fn, params, buffers, names, images, masks, n_fixed)
        else:
            logits = functional_call(segmenter, {**params, **buffers}, (images,))
            loss = loss_fn(logits, masks)
            grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
        if step == 0:
            first_step_grads = {n: g.detach() for n, g in zip(names, grads, strict=True)}
            train_loss = float(loss.detach())
        params = {n: params[n] - inner_lr * g for n, g in zip(names, grads, strict=True)}

    val_logits = functional_call(segmenter, {**params, **buffers}, (val_images,))
    val_loss = loss_fn(val_logits, val_masks)
    hyper = torch.autograd.grad(val_loss, list(hyper_params), allow_unused=True)
    hyper = tuple(torch.zeros_like(p) if g is None else g for p, g in zip(hyper_params, hyper, strict=True))
    return HyperGradient(
        grads=hyper,
        val_loss=float(val_loss.detach()),
        train_loss=train_loss,
        first_step_grads=first_step_grads,
    )


def _split_gradient(
    segmenter: nn.Module,
    loss_fn: LossFn,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    names: list[str],
    images: torch.Tensor,
    masks: torch.Tensor,
    n_fixed: int,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Gradient of the batch-mean loss with a first-order pass on the fixed rows only.

    mean over n rows = (n_fixed * mean(fixed) + n_att * mean(attached)) / n, for losses that are
    means of per-sample terms, so the gradients combine with the same weights.
    """
    n = images.shape[0]
    n_att = n - n_fixed
    state = {**params, **buffers}
    loss_fixed = loss_fn(functional_call(segmenter, state, (images[:n_fixed],)), masks[:n_fixed])
    g_fixed = torch.autograd.grad(loss_fixed, [params[k] for k in names])
    loss_att = loss_fn(functional_call(segmenter, state, (images[n_fixed:],)), masks[n_fixed:])
    g_att = torch.autograd.grad(loss_att, [params[k] for k in names], create_graph=True)
    grads = tuple((n_fixed * gf + n_att * ga) / n for gf, ga in zip(g_fixed, g_att, strict=True))
    loss = (n_fixed * loss_fixed.detach() + n_att * loss_att) / n
    return loss, grads


def fd_hypergradient(
    segmenter: nn.Module,
    loss_fn: LossFn,
    *,
    train_grads: dict[str, torch.Tensor],
    val_images: torch.Tensor,
    val_masks: torch.Tensor,
    inner_lr: float,
    hyper_grad_at: HyperGradAt,
    train_loss: float = float("nan"),
    radius: float = FD_RADIUS,
) -> HyperGradient:
    """Finite-difference (DARTS) hypergradient through one unrolled segmenter step.

    Args:
        segmenter: the segmenter at ``theta`` (not modified).
        train_grads: ``grad_theta L_train(theta, a)`` by parameter name (the level-II gradient).
        val_images, val_masks: the site's validation split.
        inner_lr: learning rate of the unrolled step.
        hyper_grad_at: maps segmenter parameters ``theta+-`` to ``grad_a L_train(theta+-, a)``, one
            tensor per hyper-parameter; only the terms of the training loss that depend on ``a`` matter.
        train_loss: reported as :attr:`HyperGradient.train_loss`.
        radius: ``eps = radius / |v|``.
    """
    names = [n for n, p in segmenter.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in segmenter.named_parameters() if p.requires_grad}
    buffers = dict(segmenter.named_buffers())
    stepped = {n: (params[n] - inner_lr * train_grads[n]).requires_grad_(True) for n in names}
    val_loss = loss_fn(functional_call(segmenter, {**stepped, **buffers}, (val_images,)), val_masks)
    v = torch.autograd.grad(val_loss, [stepped[n] for n in names])
    norm = float(torch.sqrt(sum(g.pow(2).sum() for g in v)))
    eps = radius / max(norm, 1e-12)
    plus = hyper_grad_at({n: params[n] + eps * g for n, g in zip(names, v, strict=True)})
    minus = hyper_grad_at({n: params[n] - eps * g for n, g in zip(names, v, strict=True)})
    grads = tuple(-inner_lr * (gp - gm) / (2.0 * eps) for gp, gm in zip(plus, minus, strict=True))
    return HyperGradient(
        grads=grads,
        val_loss=float(val_loss.detach()),
        train_loss=train_loss,
        first_step_grads={n: train_grads[n].detach() for n in names},
    )
