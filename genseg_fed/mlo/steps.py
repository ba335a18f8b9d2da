"""Pure training steps of GenSeg levels I and II: each takes tensors and optimisers, returns a loss dict."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from .losses import discriminator_loss, generator_adversarial_loss, reconstruction_loss

__all__ = ["Proximal", "gan_step", "proximal_penalty", "segmenter_step"]

# FedProx: (global reference weights by parameter name, mu)
Proximal = tuple[Mapping[str, torch.Tensor], float]


def proximal_penalty(module: nn.Module, proximal: Proximal | None) -> torch.Tensor | None:
    """``mu/2 * ||w - w_global||^2`` over the parameters named in the reference (FedProx)."""
    if proximal is None or proximal[1] == 0.0:
        return None
    reference, mu = proximal
    terms = [
        (p - reference[n]).pow(2).sum()
        for n, p in module.named_parameters()
        if n in reference and p.requires_grad
    ]
    return 0.5 * mu * torch.stack(terms).sum() if terms else None


def gan_step(
    generator: nn.Module,
    discriminator: nn.Module,
    opt_gen: torch.optim.Optimizer,
    opt_disc: torch.optim.Optimizer,
    masks: torch.Tensor,
    images: torch.Tensor,
    *,
    l1_weight: float,
    proximal: Proximal | None = None,
) -> dict[str, float]:
    """Level I: one pix2pix update of discriminator then generator on real pairs.

    Args:
        masks: (B, 1, H, W) in {0, 1}; images: (B, C, H, W) in [-1, 1].
        l1_weight: weight of the L1 reconstruction term (pix2pix uses 100).
    """
    fake = generator(masks)

    opt_disc.zero_grad(set_to_none=True)
    d_real = discriminator(torch.cat([masks, images], dim=1))
    d_fake = discriminator(torch.cat([masks, fake.detach()], dim=1))
    loss_d = discriminator_loss(d_real, d_fake)
    loss_d.backward()
    opt_disc.step()

    opt_gen.zero_grad(set_to_none=True)
    # The discriminator's parameter grads from this pass are discarded at its next zero_grad.
    d_fake = discriminator(torch.cat([masks, fake], dim=1))
    adv = generator_adversarial_loss(d_fake)
    l1 = reconstruction_loss(fake, images)
    loss_g = adv + l1_weight * l1
    prox = proximal_penalty(generator, proximal)
    (loss_g if prox is None else loss_g + prox).backward()
    opt_gen.step()
    return {"loss_disc": loss_d.item(), "loss_gen_adv": adv.item(), "loss_gen_l1": l1.item()}


def segmenter_step(
    segmenter: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    grads: Mapping[str, torch.Tensor] | None = None,
    weights: torch.Tensor | None = None,
    proximal: Proximal | None = None,
) -> dict[str, float]:
    """Level II: one segmenter update on (real + synthetic) pairs.

    Args:
        images: (B, C, H, W) in [-1, 1]; masks: (B, 1, H, W) in {0, 1}; both detached.
        grads: the loss gradient at the current weights if already known (level III computes
            exactly this on the same batch), which saves a forward/backward pass.
        weights: optional (B,) per-pair loss weights (level III's ``pairs`` target); not with ``grads``.
    """
    if grads is not None and weights is not None:
        raise ValueError("pass either precomputed grads or per-pair weights, not both")
    optimizer.zero_grad(set_to_none=True)
    if grads is None:
        logits = segmenter(images)
        loss = loss_fn(logits, masks) if weights is None else loss_fn(logits, masks, weights)
        loss.backward()
        loss_value = loss.item()
    else:
        for name, p in segmenter.named_parameters():
            if name in grads:
                p.grad = grads[name].clone()
        loss_value = float("nan")  # the caller reports the loss it computed with these grads
    prox = proximal_penalty(segmenter, proximal)
    if prox is not None:
        prox.backward()  # accumulates onto the loss gradient
    optimizer.step()
    return {"loss_seg": loss_value}
