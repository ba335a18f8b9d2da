"""A hospital's side of a federated run: local GenSeg rounds, evaluation and baselines.

Everything here runs on site. What a method returns is exactly what may be sent back to the
coordinator: shared weights (``fed.weights``) and scalar metrics. The site's data, its validation
split, the discriminator and optimiser states stay in memory or in the site's ``state_dir``.

On-site state (per run key, so a resumed run finds it and a new run starts clean)::

    <state_dir>/<run_key>/<site>/round-0003.pt   trainer state after round 3 (the last two are kept)
    <state_dir>/<run_key>/<site>/baseline.pt     local-only and fine-tuned segmenters
    <state_dir>/<run_key>/<site>/samples.png     mask | synthetic | real | prediction (never sent)
    <state_dir>/<run_key>/<site>/privacy.json    with privacy.enabled: secret noise seed, released rounds

With ``privacy.enabled`` the site trains with :class:`~genseg_fed.privacy.PrivateGenSegTrainer`
(its accountant lives in the round state), declines a round that would exceed its budget
(:class:`~genseg_fed.privacy.BudgetSpent`) and does not send local-only baselines (another release
of the same records that no budget covers).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_checkpoint, save_checkpoint
from ..config import Config, SiteSpec
from ..data import Augmenter, SiteSplit, load_site, split_for_training
from ..data.site import stable_seed
from ..evaluation.metrics import evaluate_segmenter
from ..local import write_samples
from ..mlo.trainer import GenSegTrainer, Networks, build_networks
from ..privacy import BudgetSpent
from ..privacy.site import CENTRAL_WEIGHT, ReleaseLog, privacy_metrics, weights_digest
from ..runtime import resolve_device
from .weights import load_shared_weights, shared_weights, split_part

__all__ = ["SiteIdentity", "SiteSession"]

logger = logging.getLogger(__name__)

_ROUND_FILE = re.compile(r"round-(\d+)\.pt$")


@dataclass(frozen=True)
class SiteIdentity:
    """What a site tells the coordinator about itself: a name, a role and counts, nothing else."""

    name: str
    role: str  # "train" or "heldout"
    n_train: int
    n_val: int
    n_test: int
    simulated_shift: bool
    description: str


class SiteSession:
    """One site's data, networks and on-site state for one run.

    Args:
        cfg: the experiment config (as the coordinator started the run).
        spec: where this site's data is.
        role: ``train`` (split into train/val/test) or ``heldout`` (every image is a test image).
        state_dir: on-site folder; this session uses ``state_dir/<run_key>/<site name>``.
        run_key: identifies the run across coordinator restarts.
    """

    def __init__(
        self,
        cfg: Config,
        spec: SiteSpec,
        role: str,
        state_dir: Path,
        *,
        run_key: str,
        epsilon: float | None = None,
        delta: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.spec = spec
        self.role = role
        self.device = resolve_device(cfg.device)
        self.dir = Path(state_dir) / _safe(run_key) / _safe(spec.name)
        data = load_site(
            spec, image_size=cfg.data.image_size, channels=cfg.data.channels, empty_masks=cfg.data.empty_masks
        )
        if role == "train":  # with the fair data-access rule: no level III, the site trains on val too
            self.split = split_for_training(data, cfg)
        else:
            empty = data.subset([])
            self.split = SiteSplit(train=empty, val=empty, test=data)
        self.seed = cfg.seed * 1000 + stable_seed(spec.name) % 1000
        # Privacy budget: the node's own setting (deployment) wins over the experiment's.
        cfg_eps, cfg_delta = cfg.privacy.budget(spec.name)
        self.epsilon = cfg_eps if epsilon is None else float(epsilon)
        self.delta = cfg_delta if delta is None else float(delta)

    # ------------------------------------------------------------------ identity
    def identity(self) -> SiteIdentity:
        s = self.split
        return SiteIdentity(
            name=self.spec.name,
            role=self.role,
            n_train=len(s.train),
            n_val=len(s.val),
            n_test=len(s.test),
            simulated_shift=s.test.simulated_shift,
            description=s.test.description,
        )

    # ------------------------------------------------------------------ training
    def _networks(self, mode: str | None = None) -> Networks:
        torch.manual_seed(self.seed)
        mode = mode or self.cfg.mlo.mode
        return build_networks(
            self.cfg.model, channels=self.cfg.data.channels, image_size=self.cfg.data.image_size, mode=mode
        )

    def _trainer(self, nets: Networks, *, noise_seed: int | None = None) -> GenSegTrainer:
        if self.role != "train":
            raise RuntimeError(f"site '{self.spec.name}' is a held-out site: it never trains")
        args = (
            self.cfg.mlo,
            nets,
            self.split.train,
            self.split.val,
            Augmenter(self.cfg.augment, seed=self.seed),
        )
        if not self.cfg.privacy.enabled:
            return GenSegTrainer(*args, device=self.device, seed=self.seed)
        from ..privacy.trainer import PrivateGenSegTrainer  # imports Opacus: only when private

        fed = self.cfg.federation
        return PrivateGenSegTrainer(
            *args,
            device=self.device,
            seed=self.seed,
            privacy=self.cfg.privacy,
            epsilon=self.epsilon,
            delta=self.delta,
            planned_iterations=fed.rounds * fed.local_iterations,
            noise_seed=noise_seed,
        )

    def train_round(
        self,
        global_weights: dict[str, np.ndarray],
        *,
        server_round: int,
        iterations: int,
        proximal_mu: float = 0.0,
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Load the global weights, train ``iterations`` GenSeg steps, return (shared weights, metrics).

        The trainer state (discriminator, optimisers, RNGs, local normalisation layers) continues
        from this site's state after round ``server_round - 1``, so re-running a round after a
        coordinator restart gives the same result as the first time.
        """
        started, cpu_started = time.perf_counter(), time.process_time()
        nets = self._networks()
        previous = self.dir / f"round-{server_round - 1:04d}.pt"
        releases = digest = None
        if self.cfg.privacy.enabled:
            releases = ReleaseLog(self.dir / "privacy.json")
            digest = weights_digest(global_weights)
            releases.check(server_round, digest, previous_state=previous.is_file())
        trainer = self._trainer(nets, noise_seed=releases.seed if releases else None)
        if previous.is_file():
            trainer.load_state_dict(load_checkpoint(previous))
        elif server_round > 1:
            logger.warning(
                "site %s: no on-site state from round %d (new or wiped site); discriminator and "
                "optimisers start fresh",
                self.spec.name,
                server_round - 1,
            )
        load_shared_weights(
            nets.parts(),
            global_weights,
            keep_local_norms=self.cfg.federation.local_norm and previous.is_file(),
        )
        proximal = None
        if proximal_mu > 0:
            proximal = {
                part: (
                    {
                        k: torch.as_tensor(v, device=self.device)
                        for k, v in split_part(global_weights, part).items()
                    },
                    proximal_mu,
                )
                for part in ("segmenter", "generator")
            }
        private = self.cfg.privacy.enabled
        if private:
            try:
                trainer.check_budget(iterations)
            except BudgetSpent:
                # Carry the ledger forward so that later rounds see the same spent budget.
                save_checkpoint(trainer.state_dict(), self.dir / f"round-{server_round:04d}.pt")
                self._prune_rounds(keep_from=server_round - 1)
                logger.info("site %s declines round %d: privacy budget spent", self.spec.name, server_round)
                raise
        steps_started, steps_cpu_started = time.perf_counter(), time.process_time()
        stats = trainer.train(iterations, proximal=proximal)
        steps = {
            "train_seconds": time.perf_counter() - steps_started,
            "train_cpu_seconds": time.process_time() - steps_cpu_started,
        }
        save_checkpoint(trainer.state_dict(), self.dir / f"round-{server_round:04d}.pt")
        self._prune_rounds(keep_from=server_round - 1)
        if releases is not None:
            releases.record(server_round, digest)
        write_samples(
            self.dir / "samples.png",
            nets,
            self.split,
            device=self.device,
            title=f"{self.spec.name}, round {server_round}",
        )
        logger.info("site %s round %d training: %s", self.spec.name, server_round, stats)
        # Every reply of a round must carry the same metric keys (Flower checks); which levels ran, and so
        # which losses exist, varies by round (pre-training, gen_every, hyper_every). Only the segmenter's
        # loss, which every round has, is sent; the rest stays in the site's log.
        metrics = {"loss_seg": float(stats.get("loss_seg", float("nan")))}
        # Wall and process CPU time (all threads) of the whole round (set-up, training, checkpoint, samples)
        # and of its optimisation steps alone; CPU time swings much less than wall time with machine load.
        metrics["seconds"] = time.perf_counter() - started
        metrics["cpu_seconds"] = time.process_time() - cpu_started
        metrics.update(steps)
        if private and not self.cfg.privacy.send_losses:
            # Losses read private records and timings reveal Poisson batch sizes: kept on site.
            logger.info("site %s round %d (kept on site): %s", self.spec.name, server_round, metrics)
            metrics = {}
        if private:
            metrics.update(privacy_metrics(trainer.report()))
        if self.cfg.privacy.central != "none":
            metrics[CENTRAL_WEIGHT] = 1.0  # client-level DP needs an unweighted mean
        metrics["num-examples"] = float(len(self.split.train))
        return shared_weights(nets.parts(), self.cfg.federation.share), metrics

    def _prune_rounds(self, *, keep_from: int) -> None:
        for path in self.dir.glob("round-*.pt"):
            match = _ROUND_FILE.search(path.name)
            if match and int(match.group(1)) < keep_from:
                path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ evaluation
    def evaluate(
        self, models: dict[str, dict[str, np.ndarray]], *, personalize: bool = False, server_round: int = 0
    ) -> dict[str, dict[str, float]]:
        """Test Dice/IoU/HD95 of each named model (shared weights) on this site's test images.

        Args:
            personalize: with FedBN-style local norms, evaluate the model this site actually uses
                (received weights + its own normalisation layers after ``server_round``).
        """
        results: dict[str, dict[str, float]] = {}
        test = self.split.test
        for name, weights in models.items():
            nets = self._networks("seg-only")
            state = self.dir / f"round-{server_round:04d}.pt"
            local_norms = personalize and self.cfg.federation.local_norm and state.is_file()
            if local_norms:
                nets.segmenter.load_state_dict(load_checkpoint(state)["networks"]["segmenter"])
            load_shared_weights({"segmenter": nets.segmenter}, weights, keep_local_norms=local_norms)
            scores = evaluate_segmenter(
                nets.segmenter.to(self.device), test.images, test.masks, device=self.device
            )
            results[name] = scores.summary()
        return results

    def baselines(
        self,
        initial_weights: dict[str, np.ndarray],
        global_weights: dict[str, np.ndarray],
        *,
        iterations: int,
        finetune_iterations: int,
    ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float]]:
        """Local-only model (same start and budget as the federation, no federation) and, if asked,
        the global model fine-tuned on site.

        Returns (segmenter weights by model kind, metrics): ``train_seconds`` / ``train_cpu_seconds``
        of the local-only model's optimisation steps, as first measured (a resumed run reads them from
        the cache).
        """
        if self.cfg.privacy.enabled:
            raise BudgetSpent(
                f"site '{self.spec.name}' sends no local-only baselines under sample-level DP: they would be "
                "another release of its records that its budget does not cover",
                {},
            )
        path = self.dir / "baseline.pt"
        key = {"iterations": iterations, "finetune_iterations": finetune_iterations}
        if path.is_file():
            cached = load_checkpoint(path)
            if cached.get("key") == key:
                return cached["models"], cached.get("metrics", {})
        out: dict[str, dict[str, np.ndarray]] = {}
        nets = self._networks()
        load_shared_weights(nets.parts(), initial_weights)
        started, cpu_started = time.perf_counter(), time.process_time()
        self._trainer(nets).train(iterations)
        metrics = {
            "train_seconds": time.perf_counter() - started,
            "train_cpu_seconds": time.process_time() - cpu_started,
        }
        out["local"] = shared_weights(nets.parts(), ["segmenter"])
        if finetune_iterations > 0:
            nets = self._networks()
            trainer = self._trainer(nets)
            load_shared_weights(nets.parts(), global_weights)
            trainer.train(finetune_iterations)
            out["finetuned"] = shared_weights(nets.parts(), ["segmenter"])
        save_checkpoint({"key": key, "models": out, "metrics": metrics}, path)
        return out, metrics


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)
