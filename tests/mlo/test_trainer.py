"""GenSegTrainer: which levels run in each mode, what they change, and exact resume."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from genseg_fed.config import AugmentConfig, MLOConfig, ModelConfig
from genseg_fed.data import Augmenter, SiteData
from genseg_fed.mlo.trainer import GenSegTrainer, build_networks

SIZE = 32
# The per-step GenSeg of the first version (no pre-training, no pool, every level every step, exact
# hypergradient); tests that exercise the newer schedule set those keys themselves.
PER_STEP = {
    "pretrain_iterations": 0,
    "pool_size": 0,
    "gen_every": 1,
    "hyper_every": 1,
    "hyper_estimator": "exact",
}
TINY = ModelConfig(seg_features=(8, 16, 32), gen_features=8, gen_depth=2, disc_features=8, disc_layers=2)


def _site(n: int, seed: int) -> SiteData:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, 1, SIZE, SIZE), np.float32)
    for i in range(n):
        r, c = rng.integers(6, 20, size=2)
        masks[i, 0, r : r + 8, c : c + 10] = 1
    images = (masks * 1.2 - 0.6 + 0.1 * rng.standard_normal(masks.shape)).astype(np.float32)
    ids = tuple(f"img{i}" for i in range(n))
    return SiteData(name="tiny", images=images, masks=masks, ids=ids, groups=ids)


def _trainer(mode: str, **mlo: object) -> GenSegTrainer:
    torch.manual_seed(0)
    cfg = MLOConfig(mode=mode, batch_size=2, **{**PER_STEP, **mlo})
    nets = build_networks(TINY, channels=1, image_size=SIZE, mode=mode)
    return GenSegTrainer(
        cfg,
        nets,
        _site(4, 0),
        _site(2, 1),
        Augmenter(AugmentConfig(), seed=0),
        device=torch.device("cpu"),
    )


def _alphas(trainer: GenSegTrainer) -> list[torch.Tensor]:
    return [a.detach().clone() for a in trainer.nets.generator.arch_parameters()]


def test_genseg_level3_moves_the_architecture_weights() -> None:
    trainer = _trainer("genseg")
    before = _alphas(trainer)
    out = trainer.train(3)
    assert out["hypergrad_norm"] > 0
    assert "time_level3" in out
    moved = [not torch.equal(a, b) for a, b in zip(before, _alphas(trainer), strict=True)]
    assert all(moved), "level III must update every architecture weight"


def test_aug_mode_runs_level1_but_not_level3() -> None:
    trainer = _trainer("aug")
    before_alpha = _alphas(trainer)
    before_w = {
        n: p.detach().clone() for n, p in trainer.nets.generator.named_parameters() if "alpha" not in n
    }
    out = trainer.train(3)
    assert "time_level3" not in out and "hypergrad_norm" not in out
    for a, b in zip(before_alpha, _alphas(trainer), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    changed = [
        not torch.equal(before_w[n], p)
        for n, p in trainer.nets.generator.named_parameters()
        if "alpha" not in n
    ]
    assert any(changed), "level I (pix2pix) must still train the generator in aug mode"


def test_seg_only_has_no_generator() -> None:
    trainer = _trainer("seg-only")
    assert trainer.nets.generator is None and trainer.nets.discriminator is None
    out = trainer.train(2)
    assert set(out) == {"loss_seg", "time_level2"}


def test_hyper_every_skips_level3_between() -> None:
    trainer = _trainer("genseg", hyper_every=2)
    level3 = ["time_level3" in trainer.step() for _ in range(4)]
    assert level3 == [True, False, True, False]


@pytest.mark.parametrize("which", ["decoder", "all"])
def test_hyper_param_subsets_receive_hypergradients(which: str) -> None:
    trainer = _trainer("genseg", hyper_params=which)
    assert len(trainer.hyper_params) > len(trainer.nets.generator.arch_parameters())
    out = trainer.train(1)
    assert out["hypergrad_norm"] > 0


def test_unrolled_steps_run() -> None:
    out = _trainer("genseg", unroll_steps=2).train(1)
    assert np.isfinite(out["loss_val_unrolled"])


def test_resume_from_state_dict_is_exact() -> None:
    a = _trainer("genseg")
    a.train(2)
    state = copy.deepcopy(a.state_dict())
    a.train(3)
    b = _trainer("genseg")
    b.load_state_dict(state)
    b.train(3)
    assert a.iteration == b.iteration == 5
    for part, net in a.nets.parts().items():
        for (name, p), q in zip(
            net.state_dict().items(), b.nets.parts()[part].state_dict().values(), strict=True
        ):
            torch.testing.assert_close(p, q, msg=f"{part}.{name} differs after resume")


def test_proximal_term_pulls_towards_the_reference() -> None:
    free, prox = _trainer("seg-only"), _trainer("seg-only")
    reference = {n: p.detach().clone() for n, p in prox.nets.segmenter.named_parameters()}
    free.train(5)
    prox.train(5, proximal={"segmenter": (reference, 50.0)})

    def dist(t: GenSegTrainer) -> float:
        return sum(
            float((p.detach() - reference[n]).pow(2).sum()) for n, p in t.nets.segmenter.named_parameters()
        )

    assert dist(prox) < dist(free)


def test_genseg_without_validation_data_is_refused() -> None:
    nets = build_networks(TINY, channels=1, image_size=SIZE, mode="genseg")
    empty = _site(2, 1).subset([])
    with pytest.raises(ValueError, match="validation split"):
        GenSegTrainer(
            MLOConfig(),
            nets,
            _site(4, 0),
            empty,
            Augmenter(AugmentConfig(), seed=0),
            device=torch.device("cpu"),
        )


# ------------------------------------------------------------------ pre-training, pool, schedule, level-III targets


def test_pretraining_runs_before_any_synthetic_pair_reaches_the_segmenter() -> None:
    trainer = _trainer("aug", pretrain_iterations=3, pool_size=2)
    seg_before = {n: p.detach().clone() for n, p in trainer.nets.segmenter.named_parameters()}
    seen = [trainer.step() for _ in range(3)]
    assert all("time_level1" in s and "time_level2" not in s and "time_synthetic" not in s for s in seen)
    for n, p in trainer.nets.segmenter.named_parameters():
        assert torch.equal(p, seg_before[n]), "pre-training must not touch the segmenter"
    assert trainer.pool.refreshes == 0 and trainer.main_iteration == 0
    first = trainer.step()
    assert "time_synthetic" in first and "time_level2" in first and trainer.pool.refreshes == 1


def test_train_adds_pending_pretraining_to_the_requested_iterations() -> None:
    trainer = _trainer("aug", pretrain_iterations=4)
    out = trainer.train(2)
    assert trainer.iteration == 6 and trainer.main_iteration == 2
    assert {"gen_check_l1", "gen_check_mean_l1"} <= set(out)  # logged once pre-training ends
    trainer.train(2)
    assert trainer.iteration == 8  # pre-training only once


def test_pool_refreshes_every_period_and_feeds_level2_from_the_pool() -> None:
    trainer = _trainer("aug", pool_size=3, pool_refresh=4, gen_every=0)
    counts = []
    for _ in range(9):
        trainer.step()
        counts.append(trainer.pool.refreshes)
    assert counts == [1, 1, 1, 1, 2, 2, 2, 2, 3]
    assert trainer.pool.images.shape == (3 * 4, 1, SIZE, SIZE)
    # between refreshes the pool does not change, and with gen_every=0 neither does the generator
    snapshot = trainer.pool.images.clone()
    trainer.step()
    assert torch.equal(snapshot, trainer.pool.images)


def test_pool_pairs_belong_to_their_record() -> None:
    trainer = _trainer("aug", pool_size=3, pool_refresh=100)
    trainer.step()
    rows = torch.tensor([2, 0])
    idx = trainer.pool.pick(rows, 2, torch.Generator().manual_seed(0))
    n = trainer.train_masks.shape[0]
    assert (idx % n).tolist() == [2, 0, 2, 0]  # copy-major, each copy from its own record
    assert len(set(idx.tolist())) == 4  # distinct pairs


def test_level1_after_pretraining_runs_every_gen_every_at_the_finetune_rate() -> None:
    trainer = _trainer("aug", pretrain_iterations=2, gen_every=3, gen_finetune_lr=1e-5)
    ran = ["time_level1" in trainer.step() for _ in range(8)]
    assert ran == [True, True, True, False, False, True, False, False]
    assert trainer.opt_gen.param_groups[0]["lr"] == 1e-5


def test_fd_estimator_moves_the_architecture_weights() -> None:
    trainer = _trainer("genseg", hyper_estimator="fd", pool_size=2)
    before = _alphas(trainer)
    out = trainer.train(2)
    assert out["hypergrad_norm"] > 0
    assert all(not torch.equal(a, b) for a, b in zip(before, _alphas(trainer), strict=True))


def test_fd_estimator_needs_one_unrolled_step() -> None:
    with pytest.raises(ValueError, match="unroll_steps"):
        _trainer("genseg", hyper_estimator="fd", unroll_steps=2)


def test_pair_weights_target_reweights_the_synthetic_rows() -> None:
    trainer = _trainer("genseg", hyper_params="pairs", hyper_estimator="fd", pool_size=2)
    gen_before = {n: p.detach().clone() for n, p in trainer.nets.generator.named_parameters()}
    rows = torch.tensor([0, 1])
    images, masks = trainer._real(rows, classic=True)
    syn_images, syn_masks = trainer._synthetic(rows, attached=False)
    weights, hg = trainer._pair_weights(images, masks, syn_images, syn_masks)
    assert weights.shape == (4,) and torch.equal(weights[:2], torch.ones(2))
    assert ((weights[2:] >= 0).all() and abs(float(weights[2:].mean()) - 1.0) < 1e-5) or weights[
        2:
    ].sum() == 0
    assert hg.grads[0].shape == (2,)
    out = trainer.train(2)
    assert "pair_weight_zero" in out and out["hypergrad_norm"] > 0
    for a, b in zip(_alphas(trainer), [gen_before[n] for n in gen_before if "alpha" in n], strict=True):
        assert torch.equal(a, b), "the pairs target never moves the generator's architecture weights"


def test_resume_with_pretraining_and_pool_is_exact() -> None:
    kw = {"pretrain_iterations": 2, "pool_size": 2, "pool_refresh": 3, "hyper_estimator": "fd"}
    a = _trainer("genseg", **kw)
    a.train(2)
    state = copy.deepcopy(a.state_dict())
    a.train(4)
    b = _trainer("genseg", **kw)
    b.load_state_dict(state)
    b.train(4)
    assert a.iteration == b.iteration == 8
    torch.testing.assert_close(a.pool.images, b.pool.images)
    for (name, p), q in zip(
        a.nets.segmenter.state_dict().items(), b.nets.segmenter.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(p, q, msg=f"segmenter.{name} differs after resume")


def test_classic_augmentation_changes_the_real_pairs_the_segmenter_sees() -> None:
    torch.manual_seed(0)
    nets = build_networks(TINY, channels=1, image_size=SIZE, mode="seg-only")
    trainer = GenSegTrainer(
        MLOConfig(mode="seg-only", batch_size=2),
        nets,
        _site(4, 0),
        _site(2, 1),
        Augmenter(AugmentConfig(classic=True), seed=0),
        device=torch.device("cpu"),
    )
    rows = torch.tensor([0, 1])
    plain = trainer._real(rows, classic=False)
    augmented = trainer._real(rows, classic=True)
    assert torch.equal(plain[0], trainer.train_images[:2])
    assert not torch.equal(augmented[0], plain[0]) and not torch.equal(augmented[1], plain[1])
