"""One site's GenSeg trainer: levels I, II and III per iteration, with checkpointable state.

Per iteration (``mode`` picks which levels run):

* **I** (``aug``, ``genseg``): pix2pix update of generator and discriminator on real pairs.
* **III** (``genseg``, every ``hyper_every`` iterations): the generator's ``hyper_params`` take a
  step along the exact hypergradient of the segmenter's validation loss, differentiated through
  ``unroll_steps`` unrolled segmenter updates on real + synthetic pairs.
* **II** (all modes): segmenter update on real pairs plus, for ``aug`` and ``genseg``, synthetic
  pairs made by the generator from augmented real masks.

Level III runs before level II on the same batch, so the level-II gradient at the current weights is
the first unrolled gradient, already computed; it is reused instead of recomputed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import MLOConfig, ModelConfig
from ..data import MaskAugmenter, SiteData
from ..models import (
    MaskToImageGenerator,
    build_discriminator,
    build_generator,
    build_segmenter,
    generator_hyper_parameters,
)
from .hypergrad import HyperGradient, segmenter_hypergradient
from .losses import SegmentationLoss
from .steps import Proximal, gan_step, segmenter_step

__all__ = ["GenSegTrainer", "Networks", "build_networks"]

logger = logging.getLogger(__name__)


@dataclass
class Networks:
    """The networks of one site. ``generator``/``discriminator`` are None in ``seg-only`` mode."""

    segmenter: nn.Module
    generator: MaskToImageGenerator | None = None
    discriminator: nn.Module | None = None

    def parts(self) -> dict[str, nn.Module]:
        """Name -> network for the networks that exist."""
        nets = {"segmenter": self.segmenter, "generator": self.generator, "discriminator": self.discriminator}
        return {k: v for k, v in nets.items() if v is not None}


def build_networks(model: ModelConfig, *, channels: int, image_size: int, mode: str) -> Networks:
    """Build the segmenter (and, unless ``mode == 'seg-only'``, generator + discriminator)."""
    segmenter = build_segmenter(
        model.segmenter, in_channels=channels, image_size=image_size, features=model.seg_features
    )
    if mode == "seg-only":
        return Networks(segmenter)
    generator = build_generator(
        out_channels=channels, features=model.gen_features, depth=model.gen_depth, ops=model.gen_ops
    )
    discriminator = build_discriminator(
        in_channels=channels, features=model.disc_features, layers=model.disc_layers
    )
    return Networks(segmenter, generator, discriminator)


def _to_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(array, dtype=torch.float32, device=device)


class GenSegTrainer:
    """Trains one site's networks with the GenSeg multi-level optimisation.

    Args:
        mlo: the MLO settings (mode, learning rates, level-III options).
        networks: networks to train, moved to ``device``.
        train: the site's training split (real labelled pairs).
        val: the site's validation split; it only drives level III and never leaves the site.
        augmenter: makes new masks from real ones for synthetic pairs.
        seed: seeds batch sampling (the augmenter has its own seed).
    """

    def __init__(
        self,
        mlo: MLOConfig,
        networks: Networks,
        train: SiteData,
        val: SiteData,
        augmenter: MaskAugmenter,
        *,
        device: torch.device,
        seed: int = 0,
    ) -> None:
        if len(train) == 0:
            raise ValueError(f"site '{train.name}': the training split is empty")
        uses_generator = mlo.mode != "seg-only"
        if uses_generator and networks.generator is None:
            raise ValueError(f"mode '{mlo.mode}' needs a generator and a discriminator")
        if mlo.mode == "genseg" and len(val) == 0:
            raise ValueError(f"site '{val.name}': mode 'genseg' needs a non-empty validation split")
        self.mlo = mlo
        self.nets = networks
        self.device = device
        for net in networks.parts().values():
            net.to(device).train()
        self.augmenter = augmenter
        self.loss_fn = SegmentationLoss()
        self.train_images = _to_tensor(train.images, device)
        self.train_masks = _to_tensor(train.masks, device)
        self.val_images = _to_tensor(val.images, device)
        self.val_masks = _to_tensor(val.masks, device)
        self.batch_rng = torch.Generator().manual_seed(seed)
        self.iteration = 0

        self.opt_seg = torch.optim.Adam(networks.segmenter.parameters(), lr=mlo.seg_lr)
        self.opt_gen = self.opt_disc = self.opt_hyper = None
        self.hyper_params: dict[str, nn.Parameter] = {}
        if uses_generator:
            gen, disc = networks.generator, networks.discriminator
            arch_ids = {id(p) for p in gen.arch_parameters()}
            # Level I trains the generator's weights; its architecture weights belong to level III.
            weights = [p for p in gen.parameters() if id(p) not in arch_ids]
            self.opt_gen = torch.optim.Adam(weights, lr=mlo.gen_lr, betas=(0.5, 0.999))
            self.opt_disc = torch.optim.Adam(disc.parameters(), lr=mlo.disc_lr, betas=(0.5, 0.999))
            if mlo.mode == "genseg":
                self.hyper_params = generator_hyper_parameters(gen, mlo.hyper_params)
                self.opt_hyper = torch.optim.Adam(
                    self.hyper_params.values(), lr=mlo.hyper_lr, betas=(0.5, 0.999)
                )

    # ------------------------------------------------------------------ one iteration
    def _sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.train_images.shape[0]
        idx = torch.randperm(n, generator=self.batch_rng)[: min(self.mlo.batch_size, n)].to(self.device)
        return self.train_images[idx], self.train_masks[idx]

    def _synthetic_masks(self, masks: torch.Tensor) -> torch.Tensor:
        return self.augmenter(masks.repeat(self.mlo.synthetic_per_real, 1, 1, 1))

    def _hypergradient(
        self, images: torch.Tensor, masks: torch.Tensor, syn_masks: torch.Tensor
    ) -> tuple[HyperGradient, torch.Tensor]:
        """Level III: the exact hypergradient on (real + synthetic) pairs; also returns the
        synthetic images of the first unrolled batch (still attached to the generator)."""
        mlo, nets = self.mlo, self.nets
        syn_images = nets.generator(syn_masks)  # attached: level III differentiates through it
        batches = [(torch.cat([images, syn_images]), torch.cat([masks, syn_masks]))]
        for _ in range(mlo.unroll_steps - 1):
            more_images, more_masks = self._sample()
            more_syn = self._synthetic_masks(more_masks)
            batches.append(
                (
                    torch.cat([more_images, nets.generator(more_syn)]),
                    torch.cat([more_masks, more_syn]),
                )
            )
        hg = segmenter_hypergradient(
            nets.segmenter,
            self.loss_fn,
            train_batches=batches,
            val_images=self.val_images,
            val_masks=self.val_masks,
            hyper_params=list(self.hyper_params.values()),
            inner_lr=mlo.inner_lr,
            n_fixed=images.shape[0],  # the real pairs do not depend on the generator
        )
        return hg, syn_images

    def _apply_hypergradient(self, grads: Sequence[torch.Tensor]) -> None:
        """Level III update of the generator's hyper-parameters along ``grads``."""
        self.opt_hyper.zero_grad(set_to_none=True)
        for p, g in zip(self.hyper_params.values(), grads, strict=True):
            p.grad = g
        self.opt_hyper.step()

    def step(self, proximal: Mapping[str, Proximal] | None = None) -> dict[str, float]:
        """One GenSeg iteration; returns losses and per-level seconds.

        Args:
            proximal: FedProx terms by network name ("segmenter", "generator"), or None.
        """
        mlo, nets = self.mlo, self.nets
        proximal = proximal or {}
        out: dict[str, float] = {}
        images, masks = self._sample()

        if mlo.mode != "seg-only":
            t0 = time.perf_counter()
            out.update(
                gan_step(
                    nets.generator,
                    nets.discriminator,
                    self.opt_gen,
                    self.opt_disc,
                    masks,
                    images,
                    l1_weight=mlo.l1_weight,
                    proximal=proximal.get("generator"),
                )
            )
            out["time_level1"] = time.perf_counter() - t0

        seg_grads = None
        uses_synthetic = (
            mlo.mode != "seg-only" and self.iteration >= mlo.gan_warmup and mlo.synthetic_per_real > 0
        )
        if uses_synthetic:
            syn_masks = self._synthetic_masks(masks)
            if mlo.mode == "genseg" and self.iteration % mlo.hyper_every == 0:
                t0 = time.perf_counter()
                hg, syn_images = self._hypergradient(images, masks, syn_masks)
                self._apply_hypergradient(hg.grads)
                seg_grads = hg.first_step_grads
                out["loss_val_unrolled"] = hg.val_loss
                out["hypergrad_norm"] = float(torch.sqrt(sum(g.pow(2).sum() for g in hg.grads)))
                out["loss_seg"] = hg.train_loss
                syn_images = syn_images.detach()
                out["time_level3"] = time.perf_counter() - t0
            else:
                with torch.no_grad():
                    syn_images = nets.generator(syn_masks)
            images = torch.cat([images, syn_images])
            masks = torch.cat([masks, syn_masks])

        t0 = time.perf_counter()
        seg_out = segmenter_step(
            nets.segmenter,
            self.opt_seg,
            self.loss_fn,
            images,
            masks,
            grads=seg_grads,
            proximal=proximal.get("segmenter"),
        )
        if seg_grads is None:
            out.update(seg_out)
        out["time_level2"] = time.perf_counter() - t0
        self.iteration += 1
        return out

    def train(
        self,
        iterations: int,
        *,
        proximal: Mapping[str, Proximal] | None = None,
        bar: tqdm | None = None,
    ) -> dict[str, float]:
        """Run ``iterations`` steps; returns the mean of each reported value over them.

        ``bar``, if given, is advanced once per step (the caller owns and closes it).
        """
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for _ in range(iterations):
            for k, v in self.step(proximal).items():
                if np.isfinite(v):
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
            if bar is not None:
                bar.update(1)
                if "loss_seg" in sums:
                    bar.set_postfix(loss_seg=f"{sums['loss_seg'] / counts['loss_seg']:.3f}", refresh=False)
        return {k: sums[k] / counts[k] for k in sums}

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Segmentation loss of the current segmenter on the validation split."""
        self.nets.segmenter.eval()
        try:
            return float(self.loss_fn(self.nets.segmenter(self.val_images), self.val_masks))
        finally:
            self.nets.segmenter.train()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training exactly: networks, optimisers, RNGs, iteration."""
        state: dict[str, Any] = {
            "iteration": self.iteration,
            "batch_rng": self.batch_rng.get_state(),
            "augmenter": self.augmenter.state_dict(),
            "networks": {k: v.state_dict() for k, v in self.nets.parts().items()},
        }
        for name in ("opt_seg", "opt_gen", "opt_disc", "opt_hyper"):
            opt = getattr(self, name)
            if opt is not None:
                state[name] = opt.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict` (same config and networks)."""
        self.iteration = int(state["iteration"])
        self.batch_rng.set_state(state["batch_rng"])
        self.augmenter.load_state_dict(state["augmenter"])
        for k, net in self.nets.parts().items():
            net.load_state_dict(state["networks"][k])
        for name in ("opt_seg", "opt_gen", "opt_disc", "opt_hyper"):
            opt = getattr(self, name)
            if opt is not None and name in state:
                opt.load_state_dict(state[name])
