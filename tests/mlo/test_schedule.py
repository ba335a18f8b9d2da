"""The level schedule: one table for every trainer and the privacy accountant."""

from __future__ import annotations

import pytest

from genseg_fed.config import MLOConfig
from genseg_fed.mlo.schedule import count_releases, levels_at, pretrain_steps


def test_seg_only_never_pretrains_or_uses_a_generator() -> None:
    mlo = MLOConfig(mode="seg-only", pretrain_iterations=50)
    assert pretrain_steps(mlo) == 0
    lv = levels_at(mlo, 0)
    assert lv.level2 and not (lv.level1 or lv.level3 or lv.synthetic or lv.refresh or lv.pretrain)
    assert count_releases(mlo, 0, 10) == {"seg": 10}


def test_genseg_schedule_table() -> None:
    mlo = MLOConfig(
        mode="genseg", pretrain_iterations=2, gen_every=3, pool_size=4, pool_refresh=4, hyper_every=2
    )
    rows = [levels_at(mlo, s) for s in range(8)]
    assert [r.pretrain for r in rows] == [True, True] + [False] * 6
    assert [r.level1 for r in rows] == [True, True, True, False, False, True, False, False]
    assert [r.refresh for r in rows] == [False, False, True, False, False, False, True, False]
    assert [r.level3 for r in rows] == [False, False, True, False, True, False, True, False]
    assert [r.level2 for r in rows] == [False, False] + [True] * 6
    assert count_releases(mlo, 0, 8) == {"disc": 4, "gen": 4, "hyper": 3, "seg": 6}


def test_no_synthetic_pairs_means_no_level3_and_no_pool() -> None:
    mlo = MLOConfig(mode="genseg", synthetic_per_real=0, pool_size=4)
    lv = levels_at(mlo, 0)
    assert not (lv.level3 or lv.refresh or lv.synthetic) and lv.level1


def test_negative_step_is_refused() -> None:
    with pytest.raises(ValueError, match="step"):
        levels_at(MLOConfig(), -1)
