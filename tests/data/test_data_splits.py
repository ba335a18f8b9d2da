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
