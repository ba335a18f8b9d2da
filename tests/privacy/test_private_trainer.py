"""PrivateGenSegTrainer: what enters each private update, its noise, its ledger, restarts and budgets."""

from __future__ import annotations

import copy

import numpy as np
import opacus.optimizers.optimizer as opacus_optimizer
import pytest
import torch

import genseg_fed.privacy.trainer as private_trainer
from genseg_fed.config import AugmentConfig, MLOConfig, ModelConfig, PrivacyConfig
from genseg_fed.data import Augmenter, SiteData
from genseg_fed.mlo.trainer import GenSegTrainer, build_networks
from genseg_fed.privacy import BudgetSpent, PrivateGenSegTrainer

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


def _site(n: int, seed: int, slices: int = 1) -> SiteData:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, 1, SIZE, SIZE), np.float32)
    for i in range(n):
        r, c = rng.integers(6, 20, size=2)
        masks[i, 0, r : r + 8, c : c + 10] = 1
    images = (masks * 1.2 - 0.6 + 0.1 * rng.standard_normal(masks.shape)).astype(np.float32)
    ids = tuple(f"img{i}" for i in range(n))
    groups = tuple(f"patient{i // slices}" for i in range(n))
    return SiteData(name="tiny", images=images, masks=masks, ids=ids, groups=groups)


def _trainer(
    mode: str = "genseg",
    *,
    privacy: PrivacyConfig | None = None,
    epsilon: float = 8.0,
    planned: int = 10,
    slices: int = 1,
    n: int = 6,
    **mlo: object,
) -> PrivateGenSegTrainer:
    torch.manual_seed(0)
    cfg = MLOConfig(**{"mode": mode, "batch_size": 3, **PER_STEP, **mlo})
    nets = build_networks(TINY, channels=1, image_size=SIZE, mode=mode)
    return PrivateGenSegTrainer(
        cfg,
        nets,
        _site(n, 0, slices),
        _site(2, 1),
        Augmenter(AugmentConfig(), seed=0),
        device=torch.device("cpu"),
        privacy=privacy or PrivacyConfig(enabled=True),
        epsilon=epsilon,
        delta=1e-5,
        planned_iterations=planned,
        noise_seed=7,
    )


def _spy_on_clipping(trainer: PrivateGenSegTrainer) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Record, for every DP-SGD update, the per-record gradients Opacus clips and what it summed."""
    seen: dict[str, list[dict[str, torch.Tensor]]] = {name: [] for name in trainer._dp_opts}
    for name, opt in trainer._dp_opts.items():
        original = opt.clip_and_accumulate

        def spy(opt=opt, original=original, name=name) -> None:
            samples = [g.detach().clone() for g in opt.grad_samples]
            original()
            summed = [p.summed_grad.detach().clone() for p in opt.params]
            seen[name].append({"samples": samples, "summed": summed})

        opt.clip_and_accumulate = spy
    return seen


@pytest.mark.parametrize(("clip", "slices"), [(1e-3, 1), (1e-3, 2), (1e3, 1)])
def test_every_record_gradient_entering_levels_1_and_2_is_clipped(clip: float, slices: int) -> None:
    privacy = PrivacyConfig(
        enabled=True, noise_multiplier=0.0, clip_disc=clip, clip_gen=clip, clip_seg=clip, clip_hyper=clip
    )
    trainer = _trainer(privacy=privacy, slices=slices, n=8, epsilon=float("inf"))
    seen = _spy_on_clipping(trainer)
    sampled: list[int] = []
    sample = trainer._sample

    def counting_sample():
        batch = sample()
        sampled.append(batch.n_records)
        return batch

    trainer._sample = counting_sample
    trainer.train(2)
    assert [len(v) for v in seen.values()] == [2, 2, 2], "disc, gen and seg each updated once per iteration"
    per_update = iter(sampled)  # order of draws per iteration: disc, gen, seg
    for it in range(2):
        for name in ("disc", "gen", "seg"):
            update = seen[name][it]
            n_records = next(per_update)
            samples = update["samples"]
            # one gradient per RECORD (patient), not per row: synthetic rows and slices are merged
            assert all(s.shape[0] == n_records for s in samples)
            if n_records == 0:
                continue
            norms = torch.stack([s.reshape(n_records, -1).norm(dim=1) for s in samples], dim=1).norm(dim=1)
            factors = (clip / (norms + 1e-6)).clamp(max=1.0)
            clipped_norms = factors * norms
            assert (clipped_norms <= clip * (1 + 1e-5)).all(), f"{name}: a record exceeds the clip norm"
            for s, total in zip(samples, update["summed"], strict=True):
                torch.testing.assert_close(torch.einsum("i,i...", factors, s), total, rtol=1e-4, atol=1e-7)
            if clip < 1:
                assert torch.allclose(clipped_norms, torch.full_like(norms, clip), rtol=1e-4)


def test_level3_update_is_clipped_to_its_norm() -> None:
    clip = 1e-6  # far below the hypergradient's norm
    privacy = PrivacyConfig(enabled=True, noise_multiplier=0.0, clip_hyper=clip)
    trainer = _trainer(privacy=privacy, epsilon=float("inf"))
    released = []
    base_apply = GenSegTrainer._apply_hypergradient

    def capture(self, grads):
        released.append([g.detach().clone() for g in grads])
        base_apply(self, grads)

    GenSegTrainer._apply_hypergradient = capture
    try:
        out = trainer.train(2)
    finally:
        GenSegTrainer._apply_hypergradient = base_apply
    assert len(released) == 2 and out["hypergrad_norm"] > 10 * clip
    for grads in released:
        norm = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
        assert norm == pytest.approx(clip, rel=1e-4)


def test_each_mechanism_adds_noise_of_multiplier_times_sensitivity(monkeypatch) -> None:
    privacy = PrivacyConfig(
        enabled=True,
        noise_multiplier=1.5,
        level3_noise_ratio=2.0,
        clip_disc=0.3,
        clip_gen=4.0,
        clip_seg=0.7,
        clip_hyper=0.05,
    )
    trainer = _trainer(privacy=privacy, epsilon=float("inf"))
    opacus_stds: list[float] = []
    real_noise = opacus_optimizer._generate_noise

    def record_opacus(std, reference, generator=None, secure_mode=False):
        opacus_stds.append(std)
        return real_noise(std, reference, generator, secure_mode)

    level3_args: list[tuple[float, float]] = []
    real_clip_and_noise = private_trainer.clip_and_noise

    def record_level3(grads, *, clip, noise_multiplier, generator):
        level3_args.append((clip, noise_multiplier))
        return real_clip_and_noise(grads, clip=clip, noise_multiplier=noise_multiplier, generator=generator)

    monkeypatch.setattr(opacus_optimizer, "_generate_noise", record_opacus)
    monkeypatch.setattr(private_trainer, "clip_and_noise", record_level3)
    trainer.step()
    m = trainer.mechanisms
    # Opacus noises every parameter tensor with std = sigma * C of its optimizer
    sizes = [len(trainer._dp_opts[n].params) for n in ("disc", "gen", "seg")]
    expected = [0.45] * sizes[0] + [6.0] * sizes[1] + [1.05] * sizes[2]  # in update order
    assert opacus_stds == pytest.approx(expected)
    assert [m[n].noise_std for n in ("disc", "gen", "seg")] == pytest.approx([0.45, 6.0, 1.05])
    # level III: clip_and_noise adds std = sigma_III * C3 (tested statistically in test_mechanisms)
    assert level3_args == [(0.05, 3.0)]
    assert m["hyper"].noise_std == pytest.approx(0.15)
    # replace-one: every mechanism's sensitivity is twice its clipping norm
    assert {n: m[n].sensitivity for n in m} == {"disc": 0.6, "gen": 8.0, "seg": 1.4, "hyper": 0.1}


def test_ledger_counts_every_release() -> None:
    trainer = _trainer(hyper_every=2)
    trainer.train(3)
    assert {n: trainer.accountant.steps(n) for n in ("disc", "gen", "seg", "hyper")} == {
        "disc": 3,
        "gen": 3,
        "seg": 3,
        "hyper": 2,
    }
    seg_only = _trainer("seg-only")
    seg_only.train(3)
    assert set(seg_only.mechanisms) == {"seg"} and seg_only.accountant.steps() == 3


def test_accountant_and_training_survive_a_restart() -> None:
    a = _trainer()
    a.train(1)
    state = copy.deepcopy(a.state_dict())
    eps_1, history_1 = a.epsilon(), a.accountant.history
    a.train(1)
    b = _trainer()
    b.load_state_dict(state)
    assert b.epsilon() == eps_1 and b.accountant.history == history_1
    b.train(1)
    assert b.epsilon() == a.epsilon() > eps_1
    for part, net in a.nets.parts().items():
        for (name, p), q in zip(
            net.state_dict().items(), b.nets.parts()[part].state_dict().values(), strict=True
        ):
            torch.testing.assert_close(p, q, msg=f"{part}.{name} differs after restart (same noise expected)")


def test_calibrated_noise_spends_exactly_the_budget_then_the_trainer_refuses() -> None:
    trainer = _trainer("seg-only", epsilon=3.0, planned=4)
    assert trainer.check_budget(4) <= 3.0
    trainer.train(4)
    assert trainer.epsilon() == pytest.approx(3.0, rel=0.02) and trainer.epsilon() <= 3.0
    with pytest.raises(BudgetSpent, match="privacy budget spent") as info:
        trainer.check_budget(1)
    assert info.value.report["epsilon"] == trainer.epsilon()
    assert info.value.report["epsilon-next"] > 3.0


def test_smaller_budget_means_more_noise() -> None:
    sigmas = [_trainer("seg-only", epsilon=e).mechanisms["seg"].noise_multiplier for e in (1.0, 3.0, 8.0)]
    assert sigmas[0] > sigmas[1] > sigmas[2] > 0
    assert _trainer("seg-only", epsilon=float("inf")).mechanisms["seg"].noise_multiplier == 0.0


def test_private_and_plain_trainers_follow_one_schedule_for_a_long_run() -> None:
    """Both trainers run the levels genseg_fed.mlo.schedule names at every step, and the accountant
    records exactly those releases (pre-training, level I every k, level III every k included)."""
    from genseg_fed.mlo.schedule import count_releases, levels_at

    kw = {"pretrain_iterations": 3, "gen_every": 4, "hyper_every": 3, "pool_size": 2, "pool_refresh": 5}
    private = _trainer(planned=20, **kw)
    torch.manual_seed(0)
    plain = GenSegTrainer(
        private.mlo,
        build_networks(TINY, channels=1, image_size=SIZE, mode="genseg"),
        _site(6, 0),
        _site(2, 1),
        Augmenter(AugmentConfig(), seed=0),
        device=torch.device("cpu"),
    )
    steps = private.pretrain_steps + 20
    for step in range(steps):
        want = levels_at(private.mlo, step)
        for trainer in (private, plain):
            out = trainer.step()
            assert ("time_level1" in out) == want.level1, step
            assert ("time_level3" in out) == want.level3, step
            assert ("time_level2" in out) == want.level2, step
    released = {name: private.accountant.steps(name) for name in ("disc", "gen", "hyper", "seg")}
    assert released == dict(count_releases(private.mlo, 0, steps))
    assert private.pool.refreshes == plain.pool.refreshes == 4


def _patients_site(replaced: bool) -> SiteData:
    """Five patients of 1-3 slices; ``replaced`` swaps patient P2's images and masks for another patient's."""
    slices = {"P0": 2, "P1": 1, "P2": 3, "P3": 2, "P4": 1}
    rng = np.random.default_rng(0)
    images, masks, ids, groups = [], [], [], []
    for p, k in slices.items():
        for s in range(k):
            m = np.zeros((1, SIZE, SIZE), np.float32)
            r, c = rng.integers(6, 20, size=2)
            if replaced and p == "P2":
                r, c = 20 - r + 6, 20 - c + 6  # another patient's anatomy in the same slot
            m[0, r : r + 8, c : c + 10] = 1
            images.append((m * 1.2 - 0.6 + 0.1 * rng.standard_normal(m.shape)).astype(np.float32))
            masks.append(m)
            ids.append(f"{p}-{s}")
            groups.append(p)
    return SiteData("site", np.stack(images), np.stack(masks), tuple(ids), tuple(groups))


@pytest.mark.parametrize("pool_size", [0, 2])
def test_two_sites_differing_in_one_patient_give_every_other_patient_identical_augmentation(
    pool_size: int,
) -> None:
    """Replace one patient: every other patient's augmented real pairs, synthetic masks and pool masks are
    drawn from the same secret streams, so they are bit-identical at every iteration (synthetic images
    are the released generator applied to those masks: post-processing, allowed to differ)."""
    seen: dict[bool, dict[tuple, torch.Tensor]] = {}
    for replaced in (False, True):
        torch.manual_seed(0)
        mlo = MLOConfig(mode="aug", batch_size=2, **{**PER_STEP, "pool_size": pool_size, "pool_refresh": 2})
        train = _patients_site(replaced)
        trainer = PrivateGenSegTrainer(
            mlo,
            build_networks(TINY, channels=1, image_size=SIZE, mode="aug"),
            train,
            _site(2, 1),
            Augmenter(AugmentConfig(elastic_prob=0.5), seed=0),
            device=torch.device("cpu"),
            privacy=PrivacyConfig(enabled=True),
            epsilon=8.0,
            delta=1e-5,
            planned_iterations=4,
            noise_seed=11,
        )
        out: dict[tuple, torch.Tensor] = {}
        real, synthetic = trainer._real, trainer._synthetic

        def spy_real(rows, *, classic, trainer=trainer, real=real, out=out, train=train):
            images, masks = real(rows, classic=classic)
            for j, r in enumerate(rows.tolist()):
                out[("real", trainer.iteration, classic, train.ids[r])] = torch.cat([images[j], masks[j]])
            return images, masks

        def spy_synthetic(rows, *, attached, trainer=trainer, synthetic=synthetic, out=out, train=train):
            images, masks = synthetic(rows, attached=attached)
            n = len(rows)
            for j in range(images.shape[0]):
                key = ("synthetic", trainer.iteration, train.ids[rows[j % n]], j // n)
                out[key] = masks[j]  # its image is the released generator's (post-processing): not compared
            return images, masks

        trainer._real, trainer._synthetic = spy_real, spy_synthetic
        trainer.train(4)
        if trainer.pool is not None:
            for i, record_id in enumerate(train.ids):
                for c in range(pool_size):
                    out[("pool", record_id, c)] = trainer.pool.masks[c * len(train) + i]
        seen[replaced] = out
    a, b = seen[False], seen[True]
    # the WOR samples use the secret sampling stream over record positions, unchanged by the replacement
    assert set(a) == set(b)
    others = [k for k in a if "P2" not in "".join(str(x) for x in k)]
    mine = [k for k in a if k not in others]
    assert len(others) > 10 and mine
    for key in others:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{key} changed with patient P2")
    # P2's real masks differ (its data changed), not because the others' draws moved
    assert any(not torch.equal(a[k], b[k]) for k in mine)


def test_augmentation_streams_are_secret_and_per_patient() -> None:
    """Two patients never share a stream; the same key with another secret gives other draws."""
    from genseg_fed.privacy.streams import RecordStreams

    keys = [("P0", 0), ("P0", 1), ("P1", 0)]
    a, b = RecordStreams(1, keys), RecordStreams(2, keys)
    draws = [torch.rand(4, generator=g) for g in a.for_rows("pairs", 3, [0, 1, 2], copies=2)]
    assert len({tuple(d.tolist()) for d in draws}) == 6
    again = [torch.rand(4, generator=g) for g in a.for_rows("pairs", 3, [0, 1, 2], copies=2)]
    assert all(torch.equal(x, y) for x, y in zip(draws, again, strict=True))
    other = torch.rand(4, generator=b.for_rows("pairs", 3, [0])[0])
    assert not torch.equal(other, draws[0])


@pytest.mark.parametrize("change", [{"batch_size": 2}, {"n": 8}])
def test_a_resumed_site_with_another_batch_size_or_n_train_refuses(change: dict) -> None:
    a = _trainer("seg-only", n=6)
    a.train(2)
    state = copy.deepcopy(a.state_dict())
    kw = {"n": change.get("n", 6)}
    if "batch_size" in change:
        kw["batch_size"] = change["batch_size"]
    b = _trainer("seg-only", **kw)
    before = copy.deepcopy(b.state_dict())
    with pytest.raises(ValueError, match="Refusing to resume"):
        b.load_state_dict(state)
    assert b.iteration == 0 and b.accountant.steps() == 0, "a refused resume changes nothing"
    torch.testing.assert_close(before["networks"], b.state_dict()["networks"])
    c = _trainer("seg-only", n=6)
    c.load_state_dict(state)  # the same settings resume
    assert c.accountant.steps() == 2 and c.sample_rate == 3 / 6


def test_gen_dropout_is_refused_under_dp() -> None:
    model = ModelConfig(
        seg_features=(8, 16, 32), gen_features=8, gen_depth=2, disc_features=8, disc_layers=2, gen_dropout=0.2
    )
    with pytest.raises(ValueError, match="gen_dropout"):
        PrivateGenSegTrainer(
            MLOConfig(mode="aug", **PER_STEP),
            build_networks(model, channels=1, image_size=SIZE, mode="aug"),
            _site(6, 0),
            _site(2, 1),
            Augmenter(AugmentConfig(), seed=0),
            device=torch.device("cpu"),
            privacy=PrivacyConfig(enabled=True),
            epsilon=8.0,
            delta=1e-5,
            planned_iterations=2,
        )
