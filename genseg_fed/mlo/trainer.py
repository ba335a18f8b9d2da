"""One site's GenSeg trainer: generator pre-training, then levels I, II and III, with checkpointable state.

Which level runs at which step is decided in one place, :mod:`genseg_fed.mlo.schedule`:

* **pre-training** (``aug``, ``genseg``): ``pretrain_iterations`` pix2pix steps before any synthetic pair
  reaches the segmenter (run by the first :meth:`GenSegTrainer.train` call, on top of its iterations).
* **I** every ``gen_every`` iterations: pix2pix update of generator and discriminator on real pairs, at
  ``gen_finetune_lr``.
* **pool**: ``pool_size`` synthetic pairs per real pair, re-rendered every ``pool_refresh`` iterations
  (``pool_size: 0`` renders new pairs every step instead).
* **III** (``genseg``, every ``hyper_every`` iterations): the level-III target takes a step along the
  hypergradient of the segmenter's validation loss through the unrolled segmenter update, exact
  (double backward) or by finite differences (``hyper_estimator: fd``). Targets (``hyper_params``): the
  generator's architecture weights (``arch``), its decoder (``decoder``) or all its weights (``all``),
  whose synthetic images are then rendered attached to the graph; or ``pairs``, a weight per synthetic
  pair of the batch (learning to reweight, Ren et al. 2018: ``w = relu(-dh/dw)``, normalised to mean 1).
* **II**: segmenter update on the real pairs (classic augmentation with ``augment.classic``) plus the
  synthetic pairs.

Where level III's first unrolled gradient equals the level-II gradient on the same batch, it is reused.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from ..config import MLOConfig, ModelConfig
from ..data import Augmenter, SiteData
from ..models import (
    MaskToImageGenerator,
    build_discriminator,
    build_generator,
    build_segmenter,
    generator_hyper_parameters,
)
from .hypergrad import HyperGradient, fd_hypergradient, segmenter_hypergradient
from .losses import SegmentationLoss
from .pool import SyntheticPool, render
from .schedule import Levels, levels_at, pretrain_steps
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
        out_channels=channels,
        features=model.gen_features,
        depth=model.gen_depth,
        ops=model.gen_ops,
        dropout=model.gen_dropout,
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
        mlo: the MLO settings (mode, schedule, learning rates, level-III options).
        networks: networks to train, moved to ``device``.
        train: the site's training split (real labelled pairs).
        val: the site's validation split; it drives level III and the generator check, never leaves the site.
        augmenter: new masks for synthetic pairs, classic augmentation and intensity jitter.
        seed: seeds batch sampling (the augmenter has its own seed).
    """

    def __init__(
        self,
        mlo: MLOConfig,
        networks: Networks,
        train: SiteData,
        val: SiteData,
        augmenter: Augmenter,
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
        if mlo.hyper_estimator == "fd" and mlo.unroll_steps != 1:
            raise ValueError(
                "mlo.hyper_estimator 'fd' differentiates one unrolled step: set mlo.unroll_steps=1"
            )
        if mlo.pool_size and mlo.synthetic_per_real > mlo.pool_size:
            raise ValueError(
                f"mlo.synthetic_per_real ({mlo.synthetic_per_real}) cannot exceed mlo.pool_size ({mlo.pool_size})"
            )
        self.mlo = mlo
        self.augment = augmenter.cfg
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
        self.iteration = 0  # steps taken, generator pre-training included (see .schedule)

        self.opt_seg = torch.optim.Adam(networks.segmenter.parameters(), lr=mlo.seg_lr)
        self.opt_gen = self.opt_disc = self.opt_hyper = None
        self.hyper_params: dict[str, nn.Parameter] = {}
        self.pool: SyntheticPool | None = None
        if uses_generator:
            gen, disc = networks.generator, networks.discriminator
            arch_ids = {id(p) for p in gen.arch_parameters()}
            # Level I trains the generator's weights; its architecture weights belong to level III.
            weights = [p for p in gen.parameters() if id(p) not in arch_ids]
            self.opt_gen = torch.optim.Adam(weights, lr=mlo.gen_lr, betas=(0.5, 0.999))
            self.opt_disc = torch.optim.Adam(disc.parameters(), lr=mlo.disc_lr, betas=(0.5, 0.999))
            if mlo.pool_size:
                self.pool = SyntheticPool(
                    self.train_masks, channels=train.images.shape[1], size=mlo.pool_size
                )
            if mlo.mode == "genseg" and mlo.hyper_params != "pairs":
                self.hyper_params = generator_hyper_parameters(gen, mlo.hyper_params)
                self.opt_hyper = torch.optim.Adam(
                    self.hyper_params.values(), lr=mlo.hyper_lr, betas=(0.5, 0.999)
                )

    # ------------------------------------------------------------------ progress
    @property
    def pretrain_steps(self) -> int:
        """Generator pre-training steps this trainer runs before its first main iteration."""
        return pretrain_steps(self.mlo)

    @property
    def main_iteration(self) -> int:
        """Main iterations done (pre-training steps not counted)."""
        return max(0, self.iteration - self.pretrain_steps)

    # ------------------------------------------------------------------ batches
    def _sample_rows(self) -> torch.Tensor:
        n = self.train_images.shape[0]
        return torch.randperm(n, generator=self.batch_rng)[: min(self.mlo.batch_size, n)]

    def _real(self, rows: torch.Tensor, *, classic: bool) -> tuple[torch.Tensor, torch.Tensor]:
        idx = rows.to(self.device)
        images, masks = self.train_images[idx], self.train_masks[idx]
        if classic and self.augment.classic:
            images, masks = self.augmenter.pairs(images, masks)
        return images, masks

    def _synthetic(self, rows: torch.Tensor, *, attached: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``synthetic_per_real`` synthetic pairs per record in ``rows`` (copy-major order).

        ``attached``: images rendered now with the generator's graph kept (level III differentiates them).
        """
        k, gen = self.mlo.synthetic_per_real, self.nets.generator
        intensity = self.augment.synthetic_intensity
        if self.pool is not None:
            idx = self.pool.pick(rows, k, self.batch_rng)
            masks = self.pool.masks[idx]
            if not attached:
                return self.pool.images[idx], masks
        else:
            masks = self.augmenter.masks(self.train_masks[rows.to(self.device)].repeat(k, 1, 1, 1))
        if attached:
            return render(gen, masks, self.augmenter, intensity=intensity), masks
        with torch.no_grad():
            return render(gen, masks, self.augmenter, intensity=intensity), masks

    # ------------------------------------------------------------------ level III
    def _hypergradient(
        self, images: torch.Tensor, masks: torch.Tensor, syn_images: torch.Tensor, syn_masks: torch.Tensor
    ) -> HyperGradient:
        """Level III for a generator target: the hypergradient on (real + synthetic) pairs, whose
        synthetic images are attached to the generator."""
        mlo, nets = self.mlo, self.nets
        hyper = list(self.hyper_params.values())
        n_real = images.shape[0]
        if mlo.hyper_estimator == "fd":
            all_images, all_masks = torch.cat([images, syn_images.detach()]), torch.cat([masks, syn_masks])
            train_grads, train_loss = self._gradient(all_images, all_masks)
            share = syn_images.shape[0] / all_images.shape[0]  # the synthetic rows' part of the batch mean

            def hyper_grad_at(params: dict[str, torch.Tensor]) -> Sequence[torch.Tensor]:
                logits = functional_call(nets.segmenter, {**params, **self._buffers()}, (syn_images,))
                loss = share * self.loss_fn(logits, syn_masks)
                grads = torch.autograd.grad(loss, hyper, retain_graph=True, allow_unused=True)
                return [torch.zeros_like(p) if g is None else g for p, g in zip(hyper, grads, strict=True)]

            return fd_hypergradient(
                nets.segmenter,
                self.loss_fn,
                train_grads=train_grads,
                val_images=self.val_images,
                val_masks=self.val_masks,
                inner_lr=mlo.inner_lr,
                hyper_grad_at=hyper_grad_at,
                train_loss=train_loss,
            )
        batches = [(torch.cat([images, syn_images]), torch.cat([masks, syn_masks]))]
        for _ in range(mlo.unroll_steps - 1):
            rows = self._sample_rows()
            more_images, more_masks = self._real(rows, classic=True)
            more_syn, more_syn_masks = self._synthetic(rows, attached=True)
            batches.append((torch.cat([more_images, more_syn]), torch.cat([more_masks, more_syn_masks])))
        return segmenter_hypergradient(
            nets.segmenter,
            self.loss_fn,
            train_batches=batches,
            val_images=self.val_images,
            val_masks=self.val_masks,
            hyper_params=hyper,
            inner_lr=mlo.inner_lr,
            n_fixed=n_real,  # the real pairs do not depend on the generator
        )

    def _pair_weights(
        self, images: torch.Tensor, masks: torch.Tensor, syn_images: torch.Tensor, syn_masks: torch.Tensor
    ) -> tuple[torch.Tensor, HyperGradient]:
        """Level III for ``pairs``: the hypergradient w.r.t. one loss weight per synthetic row (at 1), by
        finite differences, and the weights it gives (``relu(-g)``, mean 1 over the synthetic rows)."""
        all_images, all_masks = torch.cat([images, syn_images]), torch.cat([masks, syn_masks])
        n, n_syn = all_images.shape[0], syn_images.shape[0]
        train_grads, train_loss = self._gradient(all_images, all_masks)
        seg = self.nets.segmenter

        @torch.no_grad()
        def hyper_grad_at(params: dict[str, torch.Tensor]) -> Sequence[torch.Tensor]:
            logits = functional_call(seg, {**params, **self._buffers()}, (syn_images,))
            return [self.loss_fn.per_sample(logits, syn_masks) / n]  # d mean(w_i l_i) / d w_i

        hg = fd_hypergradient(
            seg,
            self.loss_fn,
            train_grads=train_grads,
            val_images=self.val_images,
            val_masks=self.val_masks,
            inner_lr=self.mlo.inner_lr,
            hyper_grad_at=hyper_grad_at,
            train_loss=train_loss,
        )
        raw = F.relu(-hg.grads[0])
        total = raw.sum()
        syn_w = raw * (n_syn / total) if total > 0 else torch.zeros_like(raw)
        weights = torch.cat([torch.ones(n - n_syn, device=syn_w.device), syn_w])
        return weights, hg

    def _gradient(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
        """The segmenter's loss gradient by parameter name, and the loss."""
        seg = self.nets.segmenter
        named = [(n, p) for n, p in seg.named_parameters() if p.requires_grad]
        loss = self.loss_fn(seg(images), masks)
        grads = torch.autograd.grad(loss, [p for _, p in named])
        return {n: g for (n, _), g in zip(named, grads, strict=True)}, float(loss.detach())

    def _buffers(self) -> dict[str, torch.Tensor]:
        return dict(self.nets.segmenter.named_buffers())

    def _apply_hypergradient(self, grads: Sequence[torch.Tensor]) -> None:
        """Level III update of the generator's hyper-parameters along ``grads``."""
        self.opt_hyper.zero_grad(set_to_none=True)
        for p, g in zip(self.hyper_params.values(), grads, strict=True):
            p.grad = g
        self.opt_hyper.step()

    # ------------------------------------------------------------------ one step
    def _set_gen_lr(self, levels: Levels) -> None:
        """Level I's learning rate: ``gen_lr`` while pre-training, then ``gen_finetune_lr`` (if set)."""
        mlo = self.mlo
        lr = mlo.gen_lr if levels.pretrain or mlo.gen_finetune_lr is None else mlo.gen_finetune_lr
        for group in self.opt_gen.param_groups:
            group["lr"] = lr

    def _level1(
        self, levels: Levels, images: torch.Tensor, masks: torch.Tensor, proximal: Proximal | None
    ) -> dict[str, float]:
        self._set_gen_lr(levels)
        return gan_step(
            self.nets.generator,
            self.nets.discriminator,
            self.opt_gen,
            self.opt_disc,
            masks,
            images,
            l1_weight=self.mlo.l1_weight,
            proximal=proximal,
        )

    def step(self, proximal: Mapping[str, Proximal] | None = None) -> dict[str, float]:
        """One step (a pre-training step or a main iteration); returns losses and per-level seconds.

        Args:
            proximal: FedProx terms by network name ("segmenter", "generator"), or None.
        """
        mlo, nets = self.mlo, self.nets
        proximal = proximal or {}
        levels = levels_at(mlo, self.iteration)
        out: dict[str, float] = {}
        rows = self._sample_rows()

        if levels.level1:
            t0 = time.perf_counter()
            images, masks = self._real(rows, classic=False)
            out.update(self._level1(levels, images, masks, proximal.get("generator")))
            out["time_level1"] = time.perf_counter() - t0
        if levels.pretrain:
            self.iteration += 1
            if self.iteration == self.pretrain_steps:
                out.update(self.generator_check())
            return out

        images, masks = self._real(rows, classic=True)
        seg_grads = weights = None
        if levels.synthetic:
            t0 = time.perf_counter()
            if levels.refresh:
                self.pool.refresh(nets.generator, self.augmenter, intensity=self.augment.synthetic_intensity)
            attached = levels.level3 and bool(self.hyper_params)
            syn_images, syn_masks = self._synthetic(rows, attached=attached)
            out["time_synthetic"] = time.perf_counter() - t0
            if levels.level3:
                t0 = time.perf_counter()
                if self.hyper_params:
                    hg = self._hypergradient(images, masks, syn_images, syn_masks)
                    self._apply_hypergradient(hg.grads)
                    seg_grads = hg.first_step_grads
                    out["loss_seg"] = hg.train_loss
                else:
                    weights, hg = self._pair_weights(images, masks, syn_images, syn_masks)
                    out["pair_weight_zero"] = float((weights[images.shape[0] :] == 0).float().mean())
                out["loss_val_unrolled"] = hg.val_loss
                out["hypergrad_norm"] = float(torch.sqrt(sum(g.pow(2).sum() for g in hg.grads)))
                out["time_level3"] = time.perf_counter() - t0
            images = torch.cat([images, syn_images.detach()])
            masks = torch.cat([masks, syn_masks])

        t0 = time.perf_counter()
        seg_out = segmenter_step(
            nets.segmenter,
            self.opt_seg,
            self.loss_fn,
            images,
            masks,
            grads=seg_grads,
            weights=weights,
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
        """Finish any pending generator pre-training, then run ``iterations`` main iterations; returns the
        mean of each reported value over them (the generator check at the end of pre-training included).

        ``bar``, if given, is advanced once per step (the caller owns and closes it).
        """
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        steps = max(0, self.pretrain_steps - self.iteration) + iterations
        for _ in range(steps):
            for k, v in self.step(proximal).items():
                if np.isfinite(v):
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
            if bar is not None:
                bar.update(1)
                if "loss_seg" in sums:
                    bar.set_postfix(loss_seg=f"{sums['loss_seg'] / counts['loss_seg']:.3f}", refresh=False)
        return {k: sums[k] / counts[k] for k in sums}

    # ------------------------------------------------------------------ checks
    @torch.no_grad()
    def validation_loss(self) -> float:
        """Segmentation loss of the current segmenter on the validation split."""
        self.nets.segmenter.eval()
        try:
            return float(self.loss_fn(self.nets.segmenter(self.val_images), self.val_masks))
        finally:
            self.nets.segmenter.train()

    @torch.no_grad()
    def generator_check(self) -> dict[str, float]:
        """Is the generator worth its images? Its L1 error on the validation pairs (never trained on)
        against two images that need no generator: the mean training image, and the mean foreground
        and background colours of the training pairs painted onto the validation mask. Empty without a
        generator or a validation split."""
        gen = self.nets.generator
        if gen is None or self.val_images.shape[0] == 0:
            return {}
        gen.eval()
        try:
            l1 = float(F.l1_loss(gen(self.val_masks), self.val_images))
        finally:
            gen.train()
        images, masks = self.train_images, self.train_masks
        mean = images.mean(dim=0, keepdim=True).expand_as(self.val_images)
        fg = (images * masks).sum(dim=(0, 2, 3)) / masks.sum().clamp_min(1.0)
        bg = (images * (1 - masks)).sum(dim=(0, 2, 3)) / (1 - masks).sum().clamp_min(1.0)
        painted = self.val_masks * fg[None, :, None, None] + (1 - self.val_masks) * bg[None, :, None, None]
        out = {
            "gen_check_l1": l1,
            "gen_check_mean_l1": float(F.l1_loss(mean, self.val_images)),
            "gen_check_paint_l1": float(F.l1_loss(painted, self.val_images)),
        }
        logger.info(
            "generator check (held-out L1): generator %.3f, mean image %.3f, painted mask %.3f",
            l1,
            out["gen_check_mean_l1"],
            out["gen_check_paint_l1"],
        )
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training exactly: networks, optimisers, RNGs, pool, iteration."""
        state: dict[str, Any] = {
            "iteration": self.iteration,
            "batch_rng": self.batch_rng.get_state(),
            "augmenter": self.augmenter.state_dict(),
            "networks": {k: v.state_dict() for k, v in self.nets.parts().items()},
        }
        if self.pool is not None:
            state["pool"] = self.pool.state_dict()
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
        if self.pool is not None and "pool" in state:
            self.pool.load_state_dict(state["pool"])
        for name in ("opt_seg", "opt_gen", "opt_disc", "opt_hyper"):
            opt = getattr(self, name)
            if opt is not None and name in state:
                opt.load_state_dict(state[name])
