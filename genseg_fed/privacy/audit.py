"""Empirical privacy audit in one training run (Steinke, Nasr and Jagielski, NeurIPS 2023).

m *canary patients* are added to a site's training split. Canary i has a fixed image (a random texture
that carries no information about its mask) and one of two masks, ``A_i`` (foreground in the top half)
or ``B_i`` (bottom half), chosen by a secret fair coin. The two choices are neighbouring datasets under
replace-one (one patient's data replaced), so for an (epsilon, delta)-DP training run no test can guess the
coins much better than randomised response with ``e^epsilon / (1 + e^epsilon)`` accuracy. After training,
the auditor scores each canary (how much better the segmenter fits ``A_i`` than ``B_i``), guesses the
coins of the ``r`` canaries it is most confident about, and counts the ``v`` correct guesses.
:func:`epsilon_lower_bound` turns ``(m, r, v)`` into an epsilon that the run provably exceeds with
confidence ``1 - p`` (Theorem 3.1 and Appendix D of arXiv:2305.08846, including the delta term). A
non-private run memorises the canaries and gets a large lower bound; a correct DP run must stay below
its reported epsilon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from ..data import SiteData
from ..mlo.losses import SegmentationLoss

__all__ = [
    "AuditResult",
    "canary_scores",
    "canary_site",
    "epsilon_lower_bound",
    "guess",
    "p_value",
    "run_canary_audit",
]


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[v or more correct of r guesses] under (epsilon, delta)-DP with m canaries (upper bound)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of epsilon-DP randomised response
    beta = float(stats.binom.sf(v - 1, r, q))
    if delta == 0:
        return min(beta, 1.0)
    alpha, tail = 0.0, 0.0
    for i in range(1, v + 1):  # tail = P[v > Binomial(r, q) >= v - i]
        tail += float(stats.binom.pmf(v - i, r, q))
        alpha = max(alpha, tail / i)
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, *, delta: float, p: float = 0.05) -> float:
    """Largest epsilon rejected at level ``p``: the run is NOT (epsilon, delta)-DP, with confidence 1 - p."""
    if p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < p:
        lo, hi = hi, 2 * hi
        if hi > 100:
            return lo
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if p_value(m, r, v, mid, delta) < p:
            lo = mid
        else:
            hi = mid
    return lo


def canary_site(
    m: int, *, image_size: int, channels: int, seed: int, name: str = "canaries"
) -> tuple[SiteData, np.ndarray, np.ndarray, np.ndarray]:
    """m canary patients (one image each) with their coins.

    Returns ``(site, coins, masks_a, masks_b)``: the site holds mask A where ``coins`` is True and mask B
    elsewhere; images are uniform noise in [-1, 1], independent of both masks.
    """
    rng = np.random.default_rng(seed)
    s = image_size
    images = rng.uniform(-1, 1, (m, channels, s, s)).astype(np.float32)
    a = np.zeros((m, 1, s, s), np.float32)
    b = np.zeros((m, 1, s, s), np.float32)
    a[:, :, : s // 2] = 1.0
    b[:, :, s // 2 :] = 1.0
    coins = rng.random(m) < 0.5
    masks = np.where(coins[:, None, None, None], a, b).astype(np.float32)
    ids = tuple(f"canary{i:04d}" for i in range(m))
    return SiteData(name, images, masks, ids, ids), coins, a, b


@torch.no_grad()
def canary_scores(
    segmenter: torch.nn.Module, images: np.ndarray, masks_a: np.ndarray, masks_b: np.ndarray
) -> np.ndarray:
    """Per canary: segmentation loss against mask B minus loss against mask A (> 0: A fits better)."""
    loss = SegmentationLoss()
    segmenter.eval()
    try:
        device = next(segmenter.parameters()).device
        logits = segmenter(torch.as_tensor(images, device=device))
        la = loss.per_sample(logits, torch.as_tensor(masks_a, device=device))
        lb = loss.per_sample(logits, torch.as_tensor(masks_b, device=device))
    finally:
        segmenter.train()
    return (lb - la).cpu().numpy()


@dataclass(frozen=True)
class AuditResult:
    """One audit: m canaries, r guesses, v correct, and the epsilon lower bound at (delta, p)."""

    m: int
    r: int
    v: int
    delta: float
    p: float
    epsilon_lower: float

    def as_dict(self) -> dict[str, float]:
        return {
            "canaries": self.m,
            "guesses": self.r,
            "correct": self.v,
            "delta": self.delta,
            "p": self.p,
            "epsilon_lower": self.epsilon_lower,
        }


def guess(
    scores: np.ndarray, coins: np.ndarray, *, guesses: int, delta: float, p: float = 0.05
) -> AuditResult:
    """Guess the coins of the ``guesses`` canaries with the largest |score| (A if score > 0), fixed in
    advance; count correct guesses and bound epsilon."""
    m = len(scores)
    r = min(int(guesses), m)
    order = np.argsort(-np.abs(scores), kind="stable")[:r]
    v = int(np.sum((scores[order] > 0) == coins[order]))
    return AuditResult(m, r, v, delta, p, epsilon_lower_bound(m, r, v, delta=delta, p=p))


def run_canary_audit(
    *,
    epsilon: float | None,
    canaries: int = 64,
    steps: int = 300,
    batch_size: int = 16,
    image_size: int = 16,
    seg_lr: float = 3e-3,
    delta: float = 1e-5,
    guesses: int | None = None,
    seed: int = 0,
    noise_seed: int | None = None,
) -> dict[str, float]:
    """Train a segmenter on a site of ``canaries`` canary patients and audit it.

    ``epsilon`` None trains without DP (:class:`~genseg_fed.mlo.trainer.GenSegTrainer`); a number trains
    with :class:`~genseg_fed.privacy.trainer.PrivateGenSegTrainer` calibrated to ``(epsilon, delta)``
    over ``steps`` iterations (seg-only, classic augmentation off so that nothing but the mechanism
    stands between the coins and the model). Returns the audit numbers and the epsilon the run reports.
    """
    from ..config import AugmentConfig, MLOConfig, ModelConfig, PrivacyConfig
    from ..data import Augmenter
    from ..mlo.trainer import GenSegTrainer, build_networks

    site, coins, masks_a, masks_b = canary_site(canaries, image_size=image_size, channels=1, seed=seed)
    val = site.subset([0])
    mlo = MLOConfig(mode="seg-only", batch_size=batch_size, seg_lr=seg_lr, iterations=steps)
    torch.manual_seed(seed)
    nets = build_networks(
        ModelConfig(seg_features=(8, 16, 32)), channels=1, image_size=image_size, mode="seg-only"
    )
    augmenter = Augmenter(AugmentConfig(classic=False), seed=seed)
    device = torch.device("cpu")
    reported = math.inf
    if epsilon is None:
        trainer = GenSegTrainer(mlo, nets, site, val, augmenter, device=device, seed=seed)
    else:
        from .trainer import PrivateGenSegTrainer

        trainer = PrivateGenSegTrainer(
            mlo,
            nets,
            site,
            val,
            augmenter,
            device=device,
            seed=seed,
            privacy=PrivacyConfig(enabled=True),
            epsilon=epsilon,
            delta=delta,
            planned_iterations=steps,
            noise_seed=noise_seed,
        )
    trainer.train(steps)
    if epsilon is not None:
        reported = trainer.epsilon()
    scores = canary_scores(nets.segmenter, site.images, masks_a, masks_b)
    result = guess(scores, coins, guesses=guesses or canaries, delta=delta)
    return {**result.as_dict(), "epsilon_target": epsilon, "epsilon_reported": reported}
