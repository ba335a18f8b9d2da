"""Deterministic group splits: disjoint, nested, test split independent of n_train / n_val."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from genseg_fed.data import DataError, split_site

# 20 groups, some with several images (patients / volumes)
GROUPS = [f"p{i:02d}" for i in range(20) for _ in range(1 + i % 3)]


def _groups(part) -> set[str]:
    return set(part.groups)


def test_deterministic(make_site):
    data = make_site(GROUPS)
    a = split_site(data, n_train=5, n_val=3, test_fraction=0.4, seed=7)
    b = split_site(data, n_train=5, n_val=3, test_fraction=0.4, seed=7)
    for x, y in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert x.ids == y.ids
    c = split_site(data, n_train=5, n_val=3, test_fraction=0.4, seed=8)
    assert c.test.ids != a.test.ids


def test_depends_on_site_name(make_site):
    a = split_site(make_site(GROUPS, name="hospital-a"), n_train=5, n_val=3, test_fraction=0.4, seed=0)
    b = split_site(make_site(GROUPS, name="hospital-b"), n_train=5, n_val=3, test_fraction=0.4, seed=0)
    assert a.test.groups != b.test.groups


@pytest.mark.parametrize(
    ("n_train", "n_val", "test_fraction", "sizes"),
    [
        (5, 3, 0.4, (5, 3, 8)),
        (None, 3, 0.4, (9, 3, 8)),
        (1, 1, 0.0, (1, 1, 0)),
        (None, 2, 0.3, (12, 2, 6)),  # 0.3 * 20 is 6, not 7 despite float rounding
        (2, 0, 0.05, (2, 0, 1)),
    ],
)
def test_sizes_disjoint_and_groups_kept_together(make_site, n_train, n_val, test_fraction, sizes):
    data = make_site(GROUPS)
    split = split_site(data, n_train=n_train, n_val=n_val, test_fraction=test_fraction, seed=0)
    parts = (split.train, split.val, split.test)
    assert tuple(len(_groups(p)) for p in parts) == sizes
    assert not _groups(split.train) & _groups(split.val)
    assert not _groups(split.train) & _groups(split.test)
    assert not _groups(split.val) & _groups(split.test)
    for part in parts:  # every image of a chosen group comes along
        assert len(part) == sum(data.groups.count(g) for g in _groups(part))
    assert not set(split.train.ids) & set(split.test.ids)
    assert "train" in split.summary()


def test_test_split_identical_across_n_train_and_nested(make_site):
    data = make_site(GROUPS)
    splits = [split_site(data, n_train=n, n_val=3, test_fraction=0.4, seed=3) for n in (1, 2, 5, 8, None)]
    for s in splits[1:]:
        assert s.test.ids == splits[0].test.ids and s.val.ids == splits[0].val.ids
    for small, large in itertools.pairwise(splits):
        assert _groups(small.train) < _groups(large.train)


def test_images_keep_their_original_order(make_site):
    data = make_site(GROUPS)
    split = split_site(data, n_train=None, n_val=3, test_fraction=0.4, seed=0)
    positions = [data.ids.index(i) for i in split.train.ids]
    assert positions == sorted(positions)
    np.testing.assert_array_equal(split.train.images[0], data.images[positions[0]])


@pytest.mark.parametrize(
    ("n_train", "n_val", "test_fraction", "message"),
    [
        (
            10,
            3,
            0.4,
            r"site 'tiny' has 20 groups \(39 images\) but the split needs 21: 8 test .* \+ 3 val \+ 10 train",
        ),
        (None, 12, 0.4, r"needs 21: 8 test .* \+ 12 val \+ at least 1 train"),
    ],
)
def test_too_few_groups(make_site, n_train, n_val, test_fraction, message):
    with pytest.raises(DataError, match=message):
        split_site(
            make_site(GROUPS, name="tiny"), n_train=n_train, n_val=n_val, test_fraction=test_fraction, seed=0
        )


def test_bad_arguments(make_site):
    with pytest.raises(ValueError, match="test_fraction"):
        split_site(make_site(GROUPS), n_train=1, n_val=1, test_fraction=1.0, seed=0)
    with pytest.raises(ValueError, match="n_train"):
        split_site(make_site(GROUPS), n_train=0, n_val=1, test_fraction=0.2, seed=0)


def test_negative_seed_is_fine(make_site):
    split = split_site(make_site(GROUPS), n_train=2, n_val=1, test_fraction=0.2, seed=-1)
    assert len(_groups(split.train)) == 2


# ----------------------------------------------------------------------------- subset_seed: which images are labelled


def test_no_subset_seed_keeps_the_split_of_before_the_option(make_site):
    # pinned from the implementation before data.subset_seed existed (same site name, groups and seed)
    split = split_site(make_site(GROUPS, name="hospital-a"), n_train=5, n_val=3, test_fraction=0.4, seed=7)
    assert sorted(_groups(split.train)) == ["p00", "p01", "p04", "p09", "p18"]
    assert sorted(_groups(split.val)) == ["p13", "p14", "p17"]
    assert sorted(_groups(split.test)) == ["p03", "p06", "p07", "p10", "p11", "p12", "p15", "p16"]
    same = split_site(
        make_site(GROUPS, name="hospital-a"), n_train=5, n_val=3, test_fraction=0.4, seed=7, subset_seed=None
    )
    assert same.train.ids == split.train.ids and same.val.ids == split.val.ids


def test_subset_seeds_resample_the_labelled_images_but_never_the_test_split(make_site):
    data = make_site(GROUPS, name="hospital-a")
    base = split_site(data, n_train=5, n_val=3, test_fraction=0.4, seed=7)
    splits = [
        split_site(data, n_train=5, n_val=3, test_fraction=0.4, seed=7, subset_seed=s) for s in range(4)
    ]
    for split in splits:
        assert split.test.ids == base.test.ids  # fixed by data.split_seed alone
        assert (len(_groups(split.train)), len(_groups(split.val))) == (5, 3)
        assert not (_groups(split.train) | _groups(split.val)) & _groups(split.test)
        assert not _groups(split.train) & _groups(split.val)
    labelled = {frozenset(_groups(s.train) | _groups(s.val)) for s in splits}
    assert len(labelled) == len(splits), "every subset seed labels other images"
    again = split_site(data, n_train=5, n_val=3, test_fraction=0.4, seed=7, subset_seed=2)
    assert again.train.ids == splits[2].train.ids and again.val.ids == splits[2].val.ids


def test_for_one_subset_seed_training_sets_are_nested_and_validation_fixed(make_site):
    data = make_site(GROUPS)
    splits = [
        split_site(data, n_train=n, n_val=3, test_fraction=0.4, seed=3, subset_seed=5)
        for n in (1, 2, 5, None)
    ]
    for small, large in itertools.pairwise(splits):
        assert _groups(small.train) < _groups(large.train)
        assert small.val.ids == large.val.ids and small.test.ids == large.test.ids


# ----------------------------------------------------------------------------- the fair data-access rule


@pytest.mark.parametrize(
    ("mode", "reads_validation"), [("genseg", True), ("aug", False), ("seg-only", False)]
)
def test_methods_without_level3_train_on_the_validation_images(make_site, mode, reads_validation):
    from genseg_fed.config import load_config
    from genseg_fed.data import split_for_training

    cfg = load_config(
        None,
        [
            f"mlo.mode={mode}",
            "data.n_train=5",
            "data.n_val=3",
            "data.test_fraction=0.4",
            "data.subset_seed=1",
        ],
    )
    data = make_site(GROUPS, name="hospital-a")
    raw = split_site(data, n_train=5, n_val=3, test_fraction=0.4, seed=0, subset_seed=1)
    split = split_for_training(data, cfg)
    assert cfg.mlo.uses_validation is reads_validation
    assert split.test.ids == raw.test.ids
    # every method reads the same labelled images; only what it does with the validation ones differs
    assert set(split.train.ids) | set(split.val.ids) == set(raw.train.ids) | set(raw.val.ids)
    if reads_validation:
        assert split.train.ids == raw.train.ids and split.val.ids == raw.val.ids
    else:
        assert len(split.val) == 0 and split.train.ids == raw.train.ids + raw.val.ids
        np.testing.assert_array_equal(split.train.images, np.concatenate([raw.train.images, raw.val.images]))
        np.testing.assert_array_equal(split.train.masks, np.concatenate([raw.train.masks, raw.val.masks]))
