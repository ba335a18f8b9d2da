"""Which GenSeg level runs at which iteration: the one schedule every trainer and the accountant use.

A site's trainer counts *steps*. The first ``pretrain_steps(mlo)`` steps pre-train the generator (level I
alone: generator and discriminator, the segmenter is untouched). Every later step is a *main iteration*
``j = step - pretrain_steps(mlo)``, which the configs' ``iterations`` / ``local_iterations`` count:

=================  =======================================================================
level              runs at main iteration ``j`` when
=================  =======================================================================
I   (pix2pix)      mode is ``aug``/``genseg``, ``gen_every > 0`` and ``j % gen_every == 0``
pool refresh       a pool is configured (``pool_size > 0``) and ``j % pool_refresh == 0``
III (hypergrad.)   mode is ``genseg``, synthetic pairs are used and ``j % hyper_every == 0``
II  (segmenter)    always; with synthetic pairs when mode is ``aug``/``genseg`` and ``synthetic_per_real > 0``
=================  =======================================================================

Differential privacy depends on this being the only copy: the private trainer releases exactly the
mechanisms these flags name, and its accountant plans its budget with :func:`count_releases`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ..config import MLOConfig

__all__ = ["Levels", "count_releases", "levels_at", "pretrain_steps"]


@dataclass(frozen=True)
class Levels:
    """What one step does."""

    pretrain: bool  # a generator pre-training step: level I only
    level1: bool  # pix2pix update of generator and discriminator on real pairs
    refresh: bool  # re-render the synthetic pool before level II
    level3: bool  # hypergradient update of the level-III target
    level2: bool  # segmenter update
    synthetic: bool  # level II (and III) use synthetic pairs

    def releases(self) -> list[str]:
        """The private mechanisms this step releases, in order (see ``genseg_fed.privacy.trainer``)."""
        names = ["disc", "gen"] if self.level1 else []
        if self.level3:
            names.append("hyper")
        if self.level2:
            names.append("seg")
        return names


def pretrain_steps(mlo: MLOConfig) -> int:
    """Steps of generator pre-training before the first main iteration (0 without a generator)."""
    return 0 if mlo.mode == "seg-only" else mlo.pretrain_iterations


def levels_at(mlo: MLOConfig, step: int) -> Levels:
    """The levels that run at ``step`` (0-based, pre-training steps included)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    pre = pretrain_steps(mlo)
    if step < pre:
        return Levels(pretrain=True, level1=True, refresh=False, level3=False, level2=False, synthetic=False)
    j = step - pre
    generative = mlo.mode != "seg-only"
    synthetic = generative and mlo.synthetic_per_real > 0
    return Levels(
        pretrain=False,
        level1=generative and mlo.gen_every > 0 and j % mlo.gen_every == 0,
        refresh=synthetic and mlo.pool_size > 0 and j % mlo.pool_refresh == 0,
        level3=synthetic and mlo.mode == "genseg" and j % mlo.hyper_every == 0,
        level2=True,
        synthetic=synthetic,
    )


def count_releases(mlo: MLOConfig, start: int, steps: int) -> Counter[str]:
    """How many times each private mechanism runs in steps ``[start, start + steps)``."""
    counts: Counter[str] = Counter()
    for step in range(start, start + steps):
        counts.update(levels_at(mlo, step).releases())
    return counts
