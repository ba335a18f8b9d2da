"""Deterministic per-site train / validation / test splits by group (patient or volume).

The unique groups of a site are sorted and shuffled with ``numpy.random.default_rng`` seeded by
``seed`` and a stable hash of the site name (never Python's salted ``hash()``). From that order:

* the first ``ceil(test_fraction * G)`` groups are the test split,
* the next ``n_val`` groups the validation split,
* the next ``n_train`` groups (``None``: all the rest) the training split.

So the test split depends only on the site, ``seed`` and ``test_fraction``: it is identical for
every method and every ``n_train``, and training sets are nested as ``n_train`` grows. ``n_train``
and ``n_val`` count *groups* (patients / volumes / records), not images: a volume contributes all
its slices. A group never appears in two splits.

``subset_seed`` (``data.subset_seed``) resamples *which* groups a site labels without touching the
test split: the groups left after the test split are shuffled again, seeded by ``subset_seed`` and
the site name, before validation and training groups are taken from them. ``None`` keeps the order
above (the behaviour before the option existed, bit for bit). For one ``subset_seed`` the training
sets are still nested as ``n_train`` grows.

**Fair data access** (:func:`training_split`): a method that does not read the validation split
(``MLOConfig.uses_validation`` is False: no level III) trains on it instead, so every method reads
the same ``n_train + n_val`` labelled groups of a site. :func:`split_for_training` is the one place
that splits a site for a config, with that rule applied; every entry point that trains uses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from genseg_fed.data.site import DataError, SiteData, stable_seed

if TYPE_CHECKING:  # the config module is imported only for type hints (data flows config -> data)
    from genseg_fed.config import Config, MLOConfig

__all__ = ["SiteSplit", "split_for_training", "split_site", "training_split"]


@dataclass(frozen=True, eq=False)
class SiteSplit:
    """The three disjoint parts of one site; ``test`` may be empty (``test_fraction=0``)."""

    train: SiteData
    val: SiteData
    test: SiteData

    def summary(self) -> str:
        """One line: images (groups) per split."""
        parts = [
            f"{name} {len(part)} images / {len(set(part.groups))} groups"
            for name, part in (("train", self.train), ("val", self.val), ("test", self.test))
        ]
        return f"{self.train.name}: " + ", ".join(parts)


def split_site(
    data: SiteData,
    *,
    n_train: int | None,
    n_val: int,
    test_fraction: float,
    seed: int,
    subset_seed: int | None = None,
) -> SiteSplit:
    """Split ``data`` by group into train / val / test (see the module docstring).

    Args:
        data: the whole site.
        n_train: training groups; ``None`` takes every group left after test and validation.
        n_val: validation groups (0 allowed).
        test_fraction: fraction of groups held out for test, rounded up; 0 gives an empty test split.
        seed: split seed (``data.split_seed``), combined with the site name.
        subset_seed: reshuffles the non-test groups before validation and training groups are
            taken (``data.subset_seed``); the test split stays the one ``seed`` gives. None: no
            reshuffle.

    Raises:
        DataError: the site has too few groups for the requested split.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if n_val < 0 or (n_train is not None and n_train < 1):
        raise ValueError(f"need n_val >= 0 and n_train >= 1 (or None), got n_val={n_val}, n_train={n_train}")
    groups = sorted(set(data.groups))
    n_groups = len(groups)
    n_test = math.ceil(round(test_fraction * n_groups, 9))  # round: 0.3 * 10 must give 3, not 4
    wanted = n_test + n_val + (n_train if n_train is not None else 1)
    if wanted > n_groups:
        train_text = f"{n_train} train" if n_train is not None else "at least 1 train"
        raise DataError(
            f"site '{data.name}' has {n_groups} groups ({len(data)} images) but the split needs {wanted}: "
            f"{n_test} test (test_fraction={test_fraction}) + {n_val} val + {train_text}; lower "
            "data.n_train, data.n_val or data.test_fraction, or give the site more data"
        )
    rng = np.random.default_rng([seed & 0xFFFF_FFFF_FFFF_FFFF, stable_seed("split", data.name)])
    order = [groups[i] for i in rng.permutation(n_groups)]
    if subset_seed is not None:  # which groups get labelled: a fresh draw from the non-test groups
        rest = order[n_test:]
        sub = np.random.default_rng([subset_seed & 0xFFFF_FFFF_FFFF_FFFF, stable_seed("subset", data.name)])
        order = order[:n_test] + [rest[i] for i in sub.permutation(len(rest))]
    stop_train = None if n_train is None else n_test + n_val + n_train
    parts = (order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val : stop_train])
    train, val, test = (_select(data, set(part)) for part in (parts[2], parts[1], parts[0]))
    return SiteSplit(train=train, val=val, test=test)


def _select(data: SiteData, groups: set[str]) -> SiteData:
    """Records whose group is in ``groups``, in their original order."""
    return data.subset([i for i, g in enumerate(data.groups) if g in groups])


def training_split(split: SiteSplit, mlo: MLOConfig) -> SiteSplit:
    """The fair data-access rule: without level III (``mlo.uses_validation`` False) the validation
    split is trained on, so every method reads the same labelled groups.

    Returns ``split`` itself when the method reads the validation split (or it is empty); otherwise a
    split whose ``train`` is ``train`` followed by ``val`` and whose ``val`` is empty. ``test`` is
    never touched.
    """
    if mlo.uses_validation or len(split.val) == 0:
        return split
    train, val = split.train, split.val
    merged = replace(
        train,
        images=np.concatenate([train.images, val.images]),
        masks=np.concatenate([train.masks, val.masks]),
        ids=train.ids + val.ids,
        groups=train.groups + val.groups,
    )
    return SiteSplit(train=merged, val=val.subset([]), test=split.test)


def split_for_training(data: SiteData, cfg: Config) -> SiteSplit:
    """``data`` split as ``cfg.data`` says, with the fair data-access rule of ``cfg.mlo`` applied.

    The one function every entry point that trains calls (``train-local``, ``train-pooled``, the
    federated site, the benchmarks), so the rule is written once.
    """
    d = cfg.data
    split = split_site(
        data,
        n_train=d.n_train,
        n_val=d.n_val,
        test_fraction=d.test_fraction,
        seed=d.split_seed,
        subset_seed=d.subset_seed,
    )
    return training_split(split, cfg.mlo)
