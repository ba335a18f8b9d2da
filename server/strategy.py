"""Aggregation strategies (Flower's own) chosen by config, and their resumable state.

=============  ================================================================================
strategy       when to use it
=============  ================================================================================
fedavg         the default: weighted by each site's training images; simple, well understood
fedprox        sites differ a lot (non-IID data, different local budgets): a proximal term
               (``federation.proximal_mu``) keeps local models near the global one
fedadam        server-side adaptive optimiser (``federation.server_lr``); can converge in fewer
               rounds, but is more sensitive to its learning rate
=============  ================================================================================

``federation.robust`` replaces the weighted mean by a coordinate-wise median (FedMedian) or a
trimmed mean (FedTrimmedAvg, 20% trimmed at each end, and at least one update at each end once
three or more arrive), which bound the influence of one poisoned update at some cost in accuracy
when all sites are honest.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Strategy

from genseg_fed.config import FederationConfig

__all__ = ["build_strategy", "load_strategy_state", "strategy_state"]

# Every node that replies takes part; the coordinator itself waits for sites with a deadline.
_SAMPLING = {
    "fraction_train": 1.0,
    "fraction_evaluate": 1.0,  # unused: the coordinator sends evaluation messages itself
    "min_train_nodes": 1,
    "min_evaluate_nodes": 1,
    "min_available_nodes": 1,
}
_STATE_ATTRS = ("m_t", "v_t")  # FedAdam moments


class TrimmedAvg(FedTrimmedAvg):
    """FedTrimmedAvg that trims at least one update at each end when 3 or more arrive.

    Flower trims ``int(beta * n)`` updates at each end: with ``beta = 0.2`` and fewer than 5 sites
    that is none at all, a plain mean that one poisoned site can move arbitrarily far.
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        n = sum(1 for r in replies if not r.has_error())
        beta = self.beta
        if n >= 3 and int(beta * n) < 1:
            self.beta = min(0.49, 1.000001 / n)  # exactly one at each end
        try:
            return super().aggregate_train(server_round, replies)
        finally:
            self.beta = beta


def build_strategy(fed: FederationConfig) -> Strategy:
    """The Flower strategy for this experiment."""
    if fed.robust == "median":
        return FedMedian(**_SAMPLING)
    if fed.robust == "trimmed_mean":
        return TrimmedAvg(beta=0.2, **_SAMPLING)
    if fed.strategy == "fedavg":
        return FedAvg(**_SAMPLING)
    if fed.strategy == "fedprox":
        return FedProx(proximal_mu=fed.proximal_mu, **_SAMPLING)
    if fed.strategy == "fedadam":
        return FedAdam(eta=fed.server_lr, eta_l=fed.server_lr, beta_1=0.9, beta_2=0.99, **_SAMPLING)
    raise ValueError(f"unknown strategy {fed.strategy!r}; choose one of ['fedavg', 'fedprox', 'fedadam']")


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """Server-side optimiser state that a resumed run must restore (empty for FedAvg/FedProx)."""
    state = {}
    for attr in _STATE_ATTRS:
        value = getattr(strategy, attr, None)
        if value is not None:
            state[attr] = {k: np.array(v, copy=True) for k, v in value.items()}
    return state


def load_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    """Restore :func:`strategy_state` output."""
    for attr, value in state.items():
        if attr in _STATE_ATTRS:
            setattr(strategy, attr, {k: np.array(v, copy=True) for k, v in value.items()})
