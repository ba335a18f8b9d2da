"""The exception a site raises instead of training when its privacy budget does not cover the request.

Kept free of torch/Opacus imports so that the Flower ClientApp can catch it cheaply.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["BudgetSpent"]


class BudgetSpent(RuntimeError):
    """The site's next round would exceed its privacy budget; ``report`` says how much is spent."""

    def __init__(self, message: str, report: Mapping[str, float]) -> None:
        super().__init__(message)
        self.report = dict(report)
