"""Central (client-level) DP with Flower's fixed-clipping DP strategy wrappers.

``privacy.central: server`` wraps the coordinator's strategy in Flower's
``DifferentialPrivacyServerSideFixedClipping``: the server clips each site's round update
(new - global weights) to ``central_clip`` and adds ``N(0, (central_noise_multiplier *
central_clip / n)^2)`` to the mean of the n updates. ``client`` uses
``DifferentialPrivacyClientSideFixedClipping`` and the sites clip their own update before sending
(:func:`central_clipping_mod`, Flower's ``fixedclipping_mod`` made safe for the other messages).

Flower's accounting path (uniform weights, strict reply count, prospective budget check) is used
with :class:`OpacusClientAccountant`, which implements Flower's ``PrivacyAccountant`` protocol on
Opacus' RDP analysis: Flower's own ``RdpAccountant`` needs the ``dp-accounting`` package
(``flwr[dp]``), which this project does not install. The analysis is the same Gaussian mechanism
without sampling amplification (every site takes part in every round), add/remove one site.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacySpent,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting import PrivacyConfig as FlowerPrivacyConfig

from ..config import PrivacyConfig
from .site import CENTRAL_WEIGHT, DECLINED

__all__ = ["OpacusClientAccountant", "central_clipping_mod", "central_state", "with_central_dp"]

logger = logging.getLogger(__name__)


class OpacusClientAccountant:
    """Flower ``PrivacyAccountant`` (client-level, no amplification) computed by Opacus' RDP analysis."""

    def __init__(self, config: FlowerPrivacyConfig, *, clip: float) -> None:
        if config.sampling_method is not SamplingMethod.NO_AMPLIFICATION:
            raise ValueError("OpacusClientAccountant supports only sampling_method='no-amplification'")
        self._config = config
        from .accountant import SiteAccountant  # Opacus: imported only when central DP is on

        self._clip = clip
        self._ledger = SiteAccountant(delta=config.target_delta)

    @property
    def config(self) -> FlowerPrivacyConfig:
        return self._config

    @property
    def num_releases(self) -> int:
        return self._ledger.steps()

    def _mechanism(self, event: GaussianPrivacyEvent) -> Any:
        from .accountant import Mechanism

        # Sensitivity of the sum of clipped site updates; the wrappers divide sum and noise by n.
        return Mechanism("central", event.noise_multiplier, 1.0, clip=self._clip, sensitivity=self._clip)

    def compose(self, event: GaussianPrivacyEvent, count: int = 1) -> None:
        self._ledger.step(self._mechanism(event), count)

    def get_epsilon(self, delta: float) -> float:
        return self._ledger.epsilon(delta)

    def get_delta(self, epsilon: float) -> float:
        raise NotImplementedError("use get_epsilon: this accountant reports epsilon at a fixed delta")

    def get_privacy_spent(self, delta: float | None = None) -> PrivacySpent:
        d = self._config.target_delta if delta is None else delta
        return PrivacySpent(
            epsilon=self._ledger.epsilon(d), delta=d, num_releases=self.num_releases, accounting_method="rdp"
        )

    def would_exceed(
        self, event: GaussianPrivacyEvent, max_epsilon: float | None = None, count: int = 1
    ) -> bool:
        limit = self._config.max_epsilon if max_epsilon is None else max_epsilon
        if limit is None:
            raise ValueError("max_epsilon must be set in the config or passed to would_exceed()")
        return self._ledger.epsilon_after({self._mechanism(event): count}) > limit

    def state_dict(self) -> dict[str, Any]:
        return self._ledger.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._ledger.load_state_dict(state)


class _Tolerant:
    """Skip (rather than crash on) a round configured for fewer sites than the noise is calibrated to.

    Flower raises in ``configure_train`` when fewer nodes are sampled than ``num_sampled_clients``;
    here that round carries no privacy event and its aggregation is refused by Flower's strict
    reply check, so the global model simply stays unchanged.
    """

    def _prepare_accounting(self, server_round: int, messages: Any) -> Any:
        messages = list(messages)
        if messages and len(messages) != self.num_sampled_clients:
            logger.warning(
                "round %d: %d of %d sites available; client-level DP noise is calibrated to %d: "
                "this round will not be aggregated",
                server_round,
                len(messages),
                self.num_sampled_clients,
                self.num_sampled_clients,
            )
            self._pending_events[server_round] = None
            return messages
        return super()._prepare_accounting(server_round, messages)


class _ServerSide(_Tolerant, DifferentialPrivacyServerSideFixedClipping):
    pass


class _ClientSide(_Tolerant, DifferentialPrivacyClientSideFixedClipping):
    pass


def with_central_dp(strategy: Strategy, privacy: PrivacyConfig, *, num_sites: int) -> Strategy:
    """Wrap ``strategy`` for ``privacy.central`` (``none`` returns it unchanged)."""
    if privacy.central == "none":
        return strategy
    if not isinstance(strategy, FedAvg):
        raise ValueError(f"client-level DP needs a FedAvg-based strategy, got {type(strategy).__name__}")
    strategy.weighted_by_key = CENTRAL_WEIGHT  # sites send 1.0: an unweighted mean, as accounted
    config = FlowerPrivacyConfig(
        target_delta=privacy.central_delta,
        population_size=num_sites,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
        max_epsilon=privacy.central_max_epsilon,
    )
    accountant = OpacusClientAccountant(config, clip=privacy.central_clip)
    wrapper = _ServerSide if privacy.central == "server" else _ClientSide
    return wrapper(
        strategy,
        privacy.central_noise_multiplier,
        privacy.central_clip,
        num_sites,
        accountant=accountant,
    )


def central_state(strategy: Strategy) -> dict[str, Any] | None:
    """Epsilon so far and the accountant state of a :func:`with_central_dp` strategy (None otherwise)."""
    accountant = getattr(strategy, "accountant", None)
    if not isinstance(accountant, OpacusClientAccountant):
        return None
    spent = accountant.get_privacy_spent()
    return {
        "epsilon": spent.epsilon,
        "delta": spent.delta,
        "releases": spent.num_releases,
        "noise_multiplier": strategy.noise_multiplier,
        "clip": strategy.clipping_norm,
        "accountant": accountant.state_dict(),
    }


def central_clipping_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """Flower's ``fixedclipping_mod`` for train messages that carry a clipping norm.

    Messages without one (no client-side central DP) and replies that carry no weights (a site
    declining its round) pass through unchanged.
    """
    configs = list(msg.content.config_records.values())
    if len(configs) != 1 or KEY_CLIPPING_NORM not in configs[0]:
        return call_next(msg, ctxt)
    reply = call_next(msg, ctxt)
    if reply.has_error() or not reply.content.array_records:
        metrics = next(iter(reply.content.metric_records.values()), {}) if not reply.has_error() else {}
        if not reply.has_error() and not metrics.get(DECLINED):
            logger.warning("central_clipping_mod: a train reply without weights that is not a decline")
        return reply
    return fixedclipping_mod(msg, ctxt, lambda _m, _c: reply)
