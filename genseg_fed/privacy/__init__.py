"""Differential privacy for GenSeg-Fed: the site accountant, the Gaussian mechanisms, the private trainer.

* :mod:`.accountant`: one ledger of every release a site makes, epsilon by Opacus' RDP analysis,
  noise calibration to a target budget.
* :mod:`.mechanisms`: per-record gradients (``torch.func``), DP-SGD via Opacus' ``DPOptimizer``,
  the clipped and noised level-III release.
* :mod:`.trainer`: :class:`PrivateGenSegTrainer`, GenSeg with every level private.

See docs/privacy.md for the threat model and the argument.
"""

from __future__ import annotations

import importlib
from typing import Any

from .budget import BudgetSpent

_LAZY = {  # imported on first use: Opacus costs about a second to import
    "Mechanism": ".accountant",
    "SiteAccountant": ".accountant",
    "calibrate_noise": ".accountant",
    "epsilon_of": ".accountant",
    "PrivateGenSegTrainer": ".trainer",
}

__all__ = [
    "BudgetSpent",
    "Mechanism",
    "PrivateGenSegTrainer",
    "SiteAccountant",
    "calibrate_noise",
    "epsilon_of",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
