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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from genseg_fed.data.site import DataError, SiteData, stable_seed

__all__ = ["SiteSplit", "split_site"]


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
    data: SiteData, *, n_train: int | None, n_val: int, test_fraction: float, seed: int
) -> SiteSplit:
    """Split ``data`` by group into train / val / test (see the module docstring).

    Args:
        data: the whole site.
        n_train: training groups; ``None`` takes every group left after test and validation.
        n_val: validation groups (0 allowed).
        test_fraction: fraction of groups held out for test, rounded up; 0 gives an empty test split.
        seed: split seed (``data.split_seed``), combined with the site name.

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
    stop_train = None if n_train is None else n_test + n_val + n_train
    parts = (order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val : stop_train])
    train, val, test = (_select(data, set(part)) for part in (parts[2], parts[1], parts[0]))
    return SiteSplit(train=train, val=val, test=test)


def _select(data: SiteData, groups: set[str]) -> SiteData:
    """Records whose group is in ``groups``, in their original order."""
    return data.subset([i for i, g in enumerate(data.groups) if g in groups])
