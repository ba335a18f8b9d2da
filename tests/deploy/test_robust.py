"""Robust aggregation against one poisoned site, and screening of non-finite updates (in-process)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Message, RecordDict

from genseg_fed.checkpoint import load_checkpoint
from genseg_fed.fed.protocol import record_to_weights, weights_to_record
from genseg_fed.fed.runconfig import experiment_config
from server.federation import run_federation
from server.strategy import TrimmedAvg

POISON = 1e4  # finite, so screening lets it through: only the aggregation can limit it
POISONED_NODE = 102  # site-c of three training sites


def _request_of(reply: Message) -> Message:
    """The request ``reply`` answers (enough of it to build another reply)."""
    req = Message(
        RecordDict(), dst_node_id=reply.metadata.src_node_id, message_type=reply.metadata.message_type
    )
    req.metadata.__dict__["_message_id"] = reply.metadata.reply_to_message_id
    req.metadata.__dict__["_src_node_id"] = reply.metadata.dst_node_id
    return req


def _as_node(reply: Message, content: RecordDict) -> Message:
    """A reply with ``content`` forged as the node that sent ``reply``."""
    from flwr.supercore.task_identity import TaskIdentity

    req = Message(
        RecordDict(), dst_node_id=reply.metadata.src_node_id, message_type=reply.metadata.message_type
    )
    req.metadata.__dict__["_message_id"] = reply.metadata.reply_to_message_id
    req.metadata.__dict__["_src_node_id"] = reply.metadata.dst_node_id
    previous, TaskIdentity.node_id = TaskIdentity.node_id, reply.metadata.src_node_id
    try:
        return Message(content, reply_to=req)
    finally:
        TaskIdentity.node_id = previous


class Tamper:
    """Adds ``value`` to every weight site-c sends; keeps a copy of every update as sent.

    (Copies, because Flower's strategies take the arrays out of the replies while aggregating.)
    """

    def __init__(self, value: float) -> None:
        self.value = np.float32(value)
        self.updates: dict[int, dict[str, np.ndarray]] = {}

    def __call__(self, node: int, reply: Message) -> Message | None:
        if reply.metadata.message_type != "train" or reply.has_error():
            return None
        weights = {k: v.copy() for k, v in record_to_weights(reply.content.array_records["arrays"]).items()}
        if node != POISONED_NODE:
            self.updates[node] = weights
            return None
        weights = {k: v + self.value for k, v in weights.items()}
        self.updates[node] = {k: v.copy() for k, v in weights.items()}
        content = RecordDict(
            {"arrays": weights_to_record(weights), "metrics": reply.content.metric_records["metrics"]}
        )
        return _as_node(reply, content)


def _one_round(
    make, robust: str, tamper: Tamper
) -> tuple[dict, dict[str, np.ndarray], dict[int, dict[str, np.ndarray]]]:
    overrides = {
        "federation.rounds": 1,
        "federation.robust": robust,
        "federation.baselines": False,
        "federation.local_iterations": 1,
    }
    _, grid, out = make(sites=3, heldout=0, overrides=overrides, intercept=tamper)
    run_federation(grid, experiment_config(grid.run_config), out, site_state_dir=out / "sites")
    metrics = json.loads((out / "metrics.json").read_text())
    return metrics, load_checkpoint(out / "checkpoint.pt")["weights"], tamper.updates


def _outside_honest_range(weights: dict[str, np.ndarray], updates: dict[int, dict[str, np.ndarray]]) -> float:
    """Largest distance of any coordinate of the new global model from the honest sites' range."""
    honest = [u for node, u in updates.items() if node != POISONED_NODE]
    worst = 0.0
    for key, value in weights.items():
        stack = np.stack([u[key] for u in honest])
        below = np.clip(stack.min(0) - value, 0, None)
        above = np.clip(value - stack.max(0), 0, None)
        worst = max(worst, float(np.max(below + above)))
    return worst


def test_robust_aggregation_bounds_the_damage_of_one_poisoned_update(tiny_federation) -> None:
    damage = {}
    for robust in ("none", "median", "trimmed_mean"):
        metrics, weights, updates = _one_round(tiny_federation, robust, Tamper(POISON))
        (rnd,) = metrics["rounds"]
        assert rnd["aggregated"] and rnd["failures"] == []  # finite: screening cannot tell
        assert set(updates) == {100, 101, POISONED_NODE}
        damage[robust] = _outside_honest_range(weights, updates)
    # FedAvg moves the global model by about POISON / 3 outside anything an honest site sent ...
    assert damage["none"] > POISON / 10
    # ... while median and trimmed mean stay within the honest sites' range, coordinate by coordinate.
    assert damage["median"] < 1e-5 and damage["trimmed_mean"] < 1e-5, damage


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_non_finite_updates_are_rejected_with_a_logged_reason(
    tiny_federation, value: float, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="server.federation"):
        metrics, weights, _ = _one_round(tiny_federation, "none", Tamper(value))
    (rnd,) = metrics["rounds"]
    assert rnd["aggregated"] and set(rnd["train"]) == {"site-a", "site-b"}
    assert [f["site"] for f in rnd["failures"]] == ["site-c"]
    assert "non-finite" in rnd["failures"][0]["reason"]
    assert any(
        "rejected the update of site-c" in r.getMessage() and "non-finite" in r.getMessage()
        for r in caplog.records
    )
    assert all(np.isfinite(v).all() for v in weights.values())


def test_trimmed_mean_trims_one_at_each_end_with_few_sites() -> None:
    """Flower's beta=0.2 trims int(0.2 * n) = 0 updates for n < 5; ours trims one of 3 or 4."""
    from flwr.app import MetricRecord
    from flwr.supercore.task_identity import TaskIdentity

    strategy = TrimmedAvg(beta=0.2)
    replies = []
    TaskIdentity.run_id, TaskIdentity.task_id = 1, 1
    for node, value in ((1, 0.0), (2, 1.0), (3, 1000.0)):
        TaskIdentity.node_id = 0
        req = Message(RecordDict(), dst_node_id=node, message_type="train")
        req.metadata.__dict__["_message_id"] = f"m{node}"
        req.metadata.__dict__["_src_node_id"] = 0
        TaskIdentity.node_id = node
        content = RecordDict(
            {
                "arrays": weights_to_record({"w": np.full(3, value, np.float32)}),
                "metrics": MetricRecord({"num-examples": 1}),
            }
        )
        replies.append(Message(content, reply_to=req))
    TaskIdentity.node_id = 0
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), 1.0)  # the middle one
    assert strategy.beta == 0.2


def test_superlink_error_replies_are_recorded_under_the_lost_site(tiny_federation) -> None:
    """Flower's SuperLink answers for a node it lost ("Node Unavailable") with source node 1."""
    from flwr.app import Error

    def lose_site_b(node: int, reply: Message) -> Message | None:
        if node != 101 or reply.metadata.message_type != "train":
            return None
        error = _as_node(reply, RecordDict())  # a reply to the same request ...
        lost = Message(Error(code=5, reason="Node Unavailable - no heartbeat"), reply_to=_request_of(error))
        lost.metadata.__dict__["_src_node_id"] = 1  # ... made by the SuperLink (node id 1), not the site
        return lost

    overrides = {"federation.rounds": 1, "federation.baselines": False, "federation.local_iterations": 1}
    _, grid, out = tiny_federation(sites=2, heldout=0, overrides=overrides, intercept=lose_site_b)
    run_federation(grid, experiment_config(grid.run_config), out, site_state_dir=out / "sites")
    (rnd,) = json.loads((out / "metrics.json").read_text())["rounds"]
    assert rnd["failures"] == [
        {"site": "site-b", "stage": "train", "reason": "Node Unavailable - no heartbeat"}
    ]
