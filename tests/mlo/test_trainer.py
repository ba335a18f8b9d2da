"""GenSegTrainer: which levels run in each mode, what they change, and exact resume."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from genseg_fed.config import AugmentConfig, MLOConfig, ModelConfig
from genseg_fed.data import MaskAugmenter, SiteData
from genseg_fed.mlo.trainer import GenSegTrainer, build_networks

SIZE = 32
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
    cfg = MLOConfig(mode=mode, batch_size=2, **mlo)
    nets = build_networks(TINY, channels=1, image_size=SIZE, mode=mode)
    return GenSegTrainer(
        cfg,
        nets,
        _site(4, 0),
        _site(2, 1),
        MaskAugmenter(AugmentConfig(), seed=0),
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
            MaskAugmenter(AugmentConfig(), seed=0),
            device=torch.device("cpu"),
        )
