"""GenSeg with patient-level differential privacy on every level that reads a site's records.

The unit of privacy is the **patient** (a record: all images / slices of one ``SiteData.groups`` value) and
the neighbouring relation is **replace one patient** (the number of training patients n is public). Per
iteration, each mechanism draws its OWN fixed-size sample of B = ``batch_size`` patients without
replacement (rate q = B / n), so each is a sampled Gaussian mechanism analysed given everything released
before it:

=========  =====================================================  =========  =================
mechanism  release                                                rate       L2 sensitivity
=========  =====================================================  =========  =================
``disc``   discriminator DP-SGD step on (real_i, G(mask_i))        q          ``2 * clip_disc``
``gen``    generator-weight DP-SGD step, adversarial + L1 to x_i   q          ``2 * clip_gen``
``hyper``  level-III update (hypergradient over ``hyper_params``)  1          ``2 * clip_hyper``
``seg``    segmenter DP-SGD step on real_i + its synthetic pairs   q          ``2 * clip_seg``
=========  =====================================================  =========  =================

A patient's gradient in ``seg`` is the mean over its real rows and the ``synthetic_per_real`` synthetic
rows made from its own augmented masks: their SUM is clipped. Every random draw that touches a patient's
rows (classic augmentation, synthetic masks and intensity, the pool pairs it uses) comes from a secret
stream of its own (:class:`~genseg_fed.privacy.streams.RecordStreams`), so no patient's presence changes
another's draws; samples, the level-III batch and the noise come from secret generators too. Level III
depends on every validation record and on the training records of its unrolled step; it is clipped as
one vector and released with no sampling amplification claimed. One
:class:`~genseg_fed.privacy.accountant.SiteAccountant` composes all releases; its ledger, the pinned
sampling (n, B), the secret generators and the calibrated noise multipliers are part of the trainer state.
See docs/privacy.md for the argument.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Mapping
from typing import Any

import torch

from ..config import MLOConfig, PrivacyConfig
from ..data import Augmenter, SiteData
from ..mlo.losses import discriminator_loss, generator_adversarial_loss, reconstruction_loss
from ..mlo.pool import render
from ..mlo.schedule import count_releases, levels_at
from ..mlo.steps import Proximal, proximal_penalty
from ..mlo.trainer import GenSegTrainer, Networks
from .accountant import SENSITIVITY_FACTOR, Mechanism, SiteAccountant, calibrate_noise
from .budget import BudgetSpent
from .mechanisms import (
    RecordBatch,
    clip_and_noise,
    dp_sgd_update,
    functional_loss,
    make_dp_optimizer,
    per_record_gradients,
    sample_records,
)
from .streams import RecordStreams

__all__ = ["BudgetSpent", "PrivateGenSegTrainer"]

logger = logging.getLogger(__name__)


class PrivateGenSegTrainer(GenSegTrainer):
    """:class:`GenSegTrainer` whose every update that reads private records is differentially private.

    Args (beyond :class:`GenSegTrainer`'s):
        privacy: clipping norms, noise settings (``noise_multiplier`` None: calibrated).
        epsilon, delta: this site's target; the noise is calibrated so that ``planned_iterations``
            iterations spend at most ``epsilon``.
        planned_iterations: main iterations the budget must cover (rounds x local iterations); the
            generator pre-training steps come on top and are accounted too.
        noise_seed: secret seed of the noise, sampling and per-patient augmentation streams. Keep it
            secret (the default None draws one from the OS); pass a number only in tests.
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
        privacy: PrivacyConfig,
        epsilon: float,
        delta: float,
        planned_iterations: int,
        noise_seed: int | None = None,
    ) -> None:
        if mlo.mode == "genseg" and mlo.hyper_params == "pairs":
            raise ValueError(
                "mlo.hyper_params 'pairs' has no private version; use arch, decoder or all under DP"
            )
        dropout = [
            m.p for m in networks.parts().get("generator", torch.nn.Identity()).modules() if _is_dropout(m)
        ]
        if any(p > 0 for p in dropout):
            raise ValueError(
                "model.gen_dropout > 0 draws dropout masks from torch's shared global stream, which no "
                "patient owns; set model.gen_dropout: 0 under privacy.enabled"
            )
        super().__init__(mlo, networks, train, val, augmenter, device=device, seed=seed)
        self.privacy = privacy
        self.target_epsilon = float(epsilon)
        self.planned_iterations = int(planned_iterations)
        groups = list(dict.fromkeys(train.groups))  # one record per patient / volume
        self.records = [
            torch.tensor([i for i, g in enumerate(train.groups) if g == group], dtype=torch.long)
            for group in groups
        ]
        # Fixed-size samples without replacement: B of n patients, the sampling the accountant analyses.
        self.sample_size = min(mlo.batch_size, len(self.records))
        self.sample_rate = self.sample_size / len(self.records)
        seed_value = secrets.randbits(62) if noise_seed is None else int(noise_seed)
        self.sample_rng = torch.Generator().manual_seed(seed_value)
        self.noise_rng = torch.Generator(device=device).manual_seed(seed_value + 1)
        within: dict[str, int] = {}
        row_keys = []
        for g in train.groups:
            row_keys.append((g, within.get(g, 0)))
            within[g] = within.get(g, 0) + 1
        self.streams = RecordStreams(seed_value + 2, row_keys)
        self._stream_purpose = "level2"
        self.accountant = SiteAccountant(delta=delta)
        self.mechanisms = self._calibrate()
        if "hyper" in self.mechanisms:
            logger.warning(
                "level III runs under DP: each release is unsampled and spends budget without amplification "
                "(docs/privacy.md: level III is off under DP in the shipped DP configs, mlo.mode: aug)"
            )
        self._dp_opts: dict[str, Any] = {}
        for name, opt in (("disc", self.opt_disc), ("gen", self.opt_gen), ("seg", self.opt_seg)):
            if opt is not None:
                self._dp_opts[name] = make_dp_optimizer(
                    opt,
                    noise_multiplier=self.mechanisms[name].noise_multiplier,
                    max_grad_norm=self.mechanisms[name].clip,
                    expected_batch_size=self.sample_size,
                    generator=self.noise_rng,
                )

    # ------------------------------------------------------------------ schedule and budget
    def _counts(self, start: int, steps: int) -> dict[str, int]:
        return dict(count_releases(self.mlo, start, steps))

    def _calibrate(self) -> dict[str, Mechanism]:
        p = self.privacy
        ratio = {"disc": 1.0, "gen": 1.0, "seg": 1.0, "hyper": p.level3_noise_ratio}
        rate = {"disc": self.sample_rate, "gen": self.sample_rate, "seg": self.sample_rate, "hyper": 1.0}
        counts = self._counts(0, self.pretrain_steps + self.planned_iterations)
        if p.noise_multiplier is not None:
            scale = p.noise_multiplier
        else:
            schedule = tuple((ratio[n], rate[n], c) for n, c in sorted(counts.items()))
            scale = calibrate_noise(
                target_epsilon=self.target_epsilon, delta=self.accountant.delta, schedule=schedule
            )
        clips = {"disc": p.clip_disc, "gen": p.clip_gen, "seg": p.clip_seg, "hyper": p.clip_hyper}
        return {
            n: Mechanism(
                n,
                noise_multiplier=ratio[n] * scale,
                sample_rate=rate[n],
                clip=clips[n],
                sensitivity=SENSITIVITY_FACTOR * clips[n],
            )
            for n in ratio
            if n in counts
        }

    def planned(self, iterations: int) -> dict[Mechanism, int]:
        """Releases the next ``iterations`` main iterations will make (with any pending pre-training)."""
        steps = max(0, self.pretrain_steps - self.iteration) + iterations
        return {self.mechanisms[n]: c for n, c in self._counts(self.iteration, steps).items()}

    def epsilon(self) -> float:
        """Epsilon spent so far (all mechanisms composed) at this site's delta."""
        return self.accountant.epsilon()

    def check_budget(self, iterations: int) -> float:
        """Epsilon after ``iterations`` more iterations; raises :class:`BudgetSpent` if over target."""
        after = self.accountant.epsilon_after(self.planned(iterations))
        if after > self.target_epsilon * (1 + 1e-9):
            raise BudgetSpent(
                f"privacy budget spent: epsilon {self.epsilon():.3f} of {self.target_epsilon:g} used; "
                f"{iterations} more iterations would reach {after:.3f}",
                {**self.report(), "epsilon-next": after},
            )
        return after

    def report(self) -> dict[str, float]:
        """Epsilon, delta, noise multipliers, clipping norms, sampling rate and release counts."""
        out = {
            "epsilon": self.epsilon(),
            "epsilon-target": self.target_epsilon,
            "delta": self.accountant.delta,
            "sample-rate": self.sample_rate,
            "sample-size": float(self.sample_size),
            "records": float(len(self.records)),
        }
        for name, m in self.mechanisms.items():
            out[f"noise-{name}"] = m.noise_multiplier
            out[f"clip-{name}"] = m.clip
            out[f"releases-{name}"] = float(self.accountant.steps(name))
        return out

    # ------------------------------------------------------------------ one iteration
    def _sample(self) -> RecordBatch:
        return sample_records(self.records, self.sample_size, self.sample_rng)

    def _sample_rows(self) -> torch.Tensor:
        """The level-III batch: rows picked by the secret sampling stream (no amplification claimed)."""
        n = self.train_images.shape[0]
        return torch.randperm(n, generator=self.sample_rng)[: min(self.mlo.batch_size, n)]

    def _real(self, rows: torch.Tensor, *, classic: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Real pairs of ``rows``; classic augmentation draws from each image's own secret stream."""
        idx = rows.to(self.device)
        images, masks = self.train_images[idx], self.train_masks[idx]
        if classic and self.augment.classic:
            gens = self.streams.for_rows(f"{self._stream_purpose}/pairs", self.iteration, rows.tolist())
            images, masks = self.augmenter.pairs(images, masks, generators=gens)
        return images, masks

    def _synthetic(self, rows: torch.Tensor, *, attached: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``synthetic_per_real`` synthetic pairs per row (copy-major), each from its patient's own streams."""
        k, gen = self.mlo.synthetic_per_real, self.nets.generator
        intensity = self.augment.synthetic_intensity
        purpose = f"{self._stream_purpose}/synthetic"
        if self.pool is not None:
            n = self.pool.real_masks.shape[0]
            picks = [
                torch.argsort(torch.rand(self.pool.size, generator=g))[:k]
                for g in self.streams.for_rows(f"{purpose}/pick", self.iteration, rows.tolist())
            ]
            copies = torch.stack(picks, dim=1) if picks else torch.zeros(k, 0, dtype=torch.long)  # (k, R)
            idx = (copies * n + rows.cpu()[None, :]).reshape(-1).to(self.pool.masks.device)
            masks = self.pool.masks[idx]
            if not attached:
                return self.pool.images[idx], masks
            gens = self.streams.for_rows(f"{purpose}/render", self.iteration, rows.tolist(), copies=k)
        else:
            gens = self.streams.for_rows(purpose, self.iteration, rows.tolist(), copies=k)
            masks = self.augmenter.masks(
                self.train_masks[rows.to(self.device)].repeat(k, 1, 1, 1), generators=gens
            )
        if attached:
            return render(gen, masks, self.augmenter, intensity=intensity, generators=gens), masks
        with torch.no_grad():
            return render(gen, masks, self.augmenter, intensity=intensity, generators=gens), masks

    def _refresh_pool(self) -> None:
        """Re-render the pool: pair c of row i from the stream (pool, iteration, its patient, image, c)."""
        n = self.pool.real_masks.shape[0]
        gens = self.streams.for_rows("pool", self.iteration, list(range(n)), copies=self.pool.size)
        self.pool.refresh(
            self.nets.generator, self.augmenter, intensity=self.augment.synthetic_intensity, generators=gens
        )

    def _release(self, name: str) -> None:
        self.accountant.step(self.mechanisms[name])

    def step(self, proximal: Mapping[str, Proximal] | None = None) -> dict[str, float]:
        """One private step; returns losses (kept on site) and per-level seconds."""
        proximal = proximal or {}
        out: dict[str, float] = {}
        levels = levels_at(self.mlo, self.iteration)
        if levels.level1:
            t0 = time.perf_counter()
            self._set_gen_lr(levels)
            out["loss_disc"] = self._disc_step(self._sample())
            out["loss_gen"] = self._gen_step(self._sample(), proximal.get("generator"))
            out["time_level1"] = time.perf_counter() - t0
        if levels.pretrain:
            self.iteration += 1
            return out
        if levels.refresh:
            self._refresh_pool()
        if levels.level3:
            t0 = time.perf_counter()
            self._stream_purpose = "level3"
            try:
                rows = self._sample_rows()  # any batch: level III claims no amplification
                images, masks = self._real(rows, classic=True)
                hg = self._hypergradient(images, masks, *self._synthetic(rows, attached=True))
            finally:
                self._stream_purpose = "level2"
            self._apply_hypergradient(hg.grads)
            out["loss_val_unrolled"] = hg.val_loss
            out["hypergrad_norm"] = float(torch.sqrt(sum(g.pow(2).sum() for g in hg.grads)))
            out["time_level3"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        out["loss_seg"] = self._seg_step(
            self._sample(), proximal.get("segmenter"), synthetic=levels.synthetic
        )
        out["time_level2"] = time.perf_counter() - t0
        self.iteration += 1
        return out

    def _apply_hypergradient(self, grads: Any) -> None:
        noisy, _ = clip_and_noise(
            grads,
            clip=self.mechanisms["hyper"].clip,
            noise_multiplier=self.mechanisms["hyper"].noise_multiplier,
            generator=self.noise_rng,
        )
        super()._apply_hypergradient(noisy)
        self._release("hyper")

    def _rows(self, batch: RecordBatch) -> tuple[torch.Tensor, torch.Tensor]:
        idx = batch.rows.to(self.device)
        return self.train_images[idx], self.train_masks[idx]

    def _disc_step(self, batch: RecordBatch) -> float:
        gen, disc = self.nets.generator, self.nets.discriminator
        images, masks = self._rows(batch)
        with torch.no_grad():  # record i's fake is made from record i's mask
            fakes = gen(masks) if batch.n_records else images
        params = {n: p.detach() for n, p in disc.named_parameters()}
        call = functional_loss(disc)

        def row_loss(p: Any, mask: torch.Tensor, image: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
            d_real = call(p, torch.cat([mask, image])[None])
            d_fake = call(p, torch.cat([mask, fake])[None])
            return discriminator_loss(d_real, d_fake)

        grads, losses = per_record_gradients(row_loss, params, [masks, images, fakes], batch)
        named = dict(disc.named_parameters())
        dp_sgd_update(self._dp_opts["disc"], {named[n]: g for n, g in grads.items()})
        self._release("disc")
        return float(losses.mean()) if losses.numel() else math.nan

    def _gen_step(self, batch: RecordBatch, proximal: Proximal | None) -> float:
        gen, disc = self.nets.generator, self.nets.discriminator
        images, masks = self._rows(batch)
        arch = {id(p) for p in gen.arch_parameters()}
        trainable = {n: p.detach() for n, p in gen.named_parameters() if id(p) not in arch}
        frozen = {n: p.detach() for n, p in gen.named_parameters() if id(p) in arch}
        call_gen = functional_loss(gen, frozen)
        call_disc = functional_loss(disc, {n: p.detach() for n, p in disc.named_parameters()})
        l1_weight = self.mlo.l1_weight

        def row_loss(p: Any, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
            fake = call_gen(p, mask[None])
            adv = generator_adversarial_loss(call_disc({}, torch.cat([mask[None], fake], dim=1)))
            return adv + l1_weight * reconstruction_loss(fake, image[None])

        grads, losses = per_record_gradients(row_loss, trainable, [masks, images], batch)
        named = dict(gen.named_parameters())
        dp_sgd_update(
            self._dp_opts["gen"],
            {named[n]: g for n, g in grads.items()},
            extra_grad=_proximal_grad(gen, proximal),
        )
        self._release("gen")
        return float(losses.mean()) if losses.numel() else math.nan

    def _seg_step(self, batch: RecordBatch, proximal: Proximal | None, *, synthetic: bool) -> float:
        mlo, seg = self.mlo, self.nets.segmenter
        images, masks = self._real(batch.rows, classic=True)  # (R, C, H, W), (R, 1, H, W)
        k = mlo.synthetic_per_real
        if synthetic and batch.rows.numel() > 0:
            syn_images, syn_masks = self._synthetic(batch.rows, attached=False)  # copy j of row r at j*R + r
            r = images.shape[0]
            syn_masks = syn_masks.view(k, r, *syn_masks.shape[1:]).transpose(0, 1)
            syn_images = syn_images.view(k, r, *syn_images.shape[1:]).transpose(0, 1)
            images = torch.cat([images[:, None], syn_images], dim=1)  # (R, 1 + k, C, H, W)
            masks = torch.cat([masks[:, None], syn_masks], dim=1)
        else:
            images, masks = images[:, None], masks[:, None]
        params = {n: p.detach() for n, p in seg.named_parameters()}
        call = functional_loss(seg)
        loss_fn = self.loss_fn

        def row_loss(p: Any, imgs: torch.Tensor, msks: torch.Tensor) -> torch.Tensor:
            return loss_fn(call(p, imgs), msks)  # mean over the record's real + synthetic rows

        grads, losses = per_record_gradients(row_loss, params, [images, masks], batch)
        named = dict(seg.named_parameters())
        dp_sgd_update(
            self._dp_opts["seg"],
            {named[n]: g for n, g in grads.items()},
            extra_grad=_proximal_grad(seg, proximal),
        )
        self._release("seg")
        return float(losses.mean()) if losses.numel() else math.nan

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The base trainer state plus the accountant, the noise multipliers and the secret generators."""
        state = super().state_dict()
        state["privacy"] = {
            "accountant": self.accountant.state_dict(),
            "mechanisms": {n: vars(m).copy() for n, m in self.mechanisms.items()},
            "target_epsilon": self.target_epsilon,
            "sampling": {"records": len(self.records), "sample_size": self.sample_size},
            "sample_rng": self.sample_rng.get_state(),
            "noise_rng": self.noise_rng.get_state(),
        }
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the saved noise multipliers win over a new calibration.

        Raises ``ValueError`` (and changes nothing) when the sampling changed since the state was saved:
        the ledger's releases were accounted at the saved rate B / n, so a site whose batch size or number
        of training patients changed must not continue that ledger.
        """
        priv = state.get("privacy")
        if priv is None:
            raise ValueError("this trainer state has no privacy ledger: it was not trained privately")
        saved = priv.get("sampling")
        now = {"records": len(self.records), "sample_size": self.sample_size}
        if saved != now:
            raise ValueError(
                f"privacy: this site's ledger was accounted with {saved} (patients n, batch B) but it would now "
                f"sample {now}; a changed mlo.batch_size or data.n_train would spend budget at a rate the "
                "ledger does not cover. Refusing to resume: restore the settings or start a new run."
            )
        super().load_state_dict(state)
        self.accountant.load_state_dict(priv["accountant"])
        saved = {n: Mechanism(**m) for n, m in priv["mechanisms"].items()}
        if saved != self.mechanisms:
            logger.warning("privacy settings changed since this state was saved; keeping the saved noise")
            self.mechanisms = saved
            for name, opt in self._dp_opts.items():
                opt.noise_multiplier = saved[name].noise_multiplier
                opt.max_grad_norm = saved[name].clip
        self.sample_rng.set_state(priv["sample_rng"])
        self.noise_rng.set_state(priv["noise_rng"])


_DROPOUT = (
    torch.nn.Dropout,
    torch.nn.Dropout1d,
    torch.nn.Dropout2d,
    torch.nn.Dropout3d,
    torch.nn.AlphaDropout,
    torch.nn.FeatureAlphaDropout,
)


def _is_dropout(module: torch.nn.Module) -> bool:
    return isinstance(module, _DROPOUT)


def _proximal_grad(module: torch.nn.Module, proximal: Proximal | None) -> Any:
    """Adds the FedProx gradient (data-independent) to ``p.grad`` after the noise, or None."""
    if proximal is None or proximal[1] == 0.0:
        return None

    def add() -> None:
        prox = proximal_penalty(module, proximal)
        if prox is None:
            return
        params = [p for p in module.parameters() if p.grad is not None]
        for p, g in zip(params, torch.autograd.grad(prox, params, allow_unused=True), strict=True):
            if g is not None:
                p.grad = p.grad + g

    return add
