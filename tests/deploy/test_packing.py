"""Packed weight records: exact round trip, refused bad layouts, same federation result, fewer objects."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from genseg_fed.checkpoint import load_checkpoint
from genseg_fed.fed.packing import (
    LAYOUT_RECORD,
    PackingError,
    PackingGrid,
    pack_content,
    packing_mod,
    unpack_content,
)
from genseg_fed.fed.protocol import record_to_weights, weights_to_record
from genseg_fed.fed.runconfig import experiment_config
from server.federation import run_federation


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {
        "segmenter/a.weight": (8, 1, 3, 3),
        "segmenter/a.bias": (8,),
        "generator/b": (2, 3),
        "generator/s": (),
    }
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def test_pack_unpack_is_exact_and_leaves_other_records_alone() -> None:
    weights = _weights()
    content = RecordDict(
        {
            "arrays": weights_to_record(weights),
            "metrics": MetricRecord({"num-examples": 4.0}),
            "config": ConfigRecord({"server-round": 2}),
        }
    )
    packed = pack_content(content)
    assert set(packed) == {"arrays", "metrics", "config", LAYOUT_RECORD}
    assert len(packed["arrays"]) == 1  # one object instead of one per tensor
    restored = unpack_content(packed)
    assert list(restored) == ["arrays", "metrics", "config"]
    back = record_to_weights(restored["arrays"])
    direct = record_to_weights(weights_to_record(weights))  # what the unpacked path delivers
    assert list(back) == list(weights)
    for key, value in direct.items():
        np.testing.assert_array_equal(back[key], value)
        assert back[key].shape == value.shape and back[key].dtype == np.float32
    assert dict(restored["metrics"]) == {"num-examples": 4.0} and dict(restored["config"]) == {
        "server-round": 2
    }
    assert unpack_content(content) is content  # not packed: unchanged
    single = RecordDict({"arrays": weights_to_record({"x": np.zeros(3, np.float32)})})
    assert pack_content(single) is single  # nothing to gain


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ('[["a", [2, 2]]]', "values for a layout of 4"),  # too short for the data
        ('[["a", [-1]]]', "negative"),
        ('[["a", [1]], ["a", [1]]]', "repeats"),
        ("not json", "unreadable"),
    ],
)
def test_bad_layouts_are_refused(layout: str, message: str) -> None:
    packed = pack_content(RecordDict({"arrays": weights_to_record(_weights())}))
    packed[LAYOUT_RECORD] = ConfigRecord({"arrays": layout})
    with pytest.raises(PackingError, match=message):
        unpack_content(packed)


def test_client_mod_unpacks_requests_and_packs_replies() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    weights = _weights()
    request = Message(
        pack_content(RecordDict({"arrays": weights_to_record(weights), "config": ConfigRecord({"x": 1})})),
        dst_node_id=5,
        message_type="train",
    )
    request.metadata.__dict__["_message_id"] = "m1"
    seen = {}

    def handler(msg: Message, context: Context) -> Message:
        seen["keys"] = sorted(msg.content)
        seen["arrays"] = record_to_weights(msg.content["arrays"])
        TaskIdentity.node_id = 5
        content = RecordDict({"arrays": weights_to_record(_weights(1)), "metrics": MetricRecord({"n": 1.0})})
        return Message(content, reply_to=msg)

    context = Context(1, 5, {}, RecordDict(), {})
    reply = packing_mod(request, context, handler)
    assert seen["keys"] == ["arrays", "config"]  # the app sees exactly what the coordinator meant
    np.testing.assert_array_equal(seen["arrays"]["segmenter/a.weight"], weights["segmenter/a.weight"])
    assert LAYOUT_RECORD in reply.content and len(reply.content["arrays"]) == 1
    assert reply.metadata.reply_to_message_id == "m1"
    # An unpacked request (an older coordinator, the in-process tests) gets an unpacked reply.
    plain = Message(RecordDict({"arrays": weights_to_record(weights)}), dst_node_id=5, message_type="train")
    plain.metadata.__dict__["_message_id"] = "m2"
    TaskIdentity.node_id = 0
    assert LAYOUT_RECORD not in packing_mod(plain, context, handler).content


class _Counting:
    """Wraps a grid and counts the array objects that cross it."""

    def __init__(self, grid) -> None:
        self.grid = grid
        self.arrays = 0

    def push_messages(self, messages):
        messages = list(messages)
        self.arrays += sum(len(r) for m in messages for r in m.content.array_records.values())
        return self.grid.push_messages(messages)

    def pull_messages(self, ids):
        replies = list(self.grid.pull_messages(ids))
        self.arrays += sum(
            len(r) for m in replies if not m.has_error() for r in m.content.array_records.values()
        )
        return replies

    def __getattr__(self, name):
        return getattr(self.grid, name)


def test_a_packed_federation_gives_the_same_model_with_far_fewer_objects(tiny_federation) -> None:
    """The real coordinator and ClientApp (with its packing mod), packed vs not, same weights after 1 round."""
    overrides = {"federation.rounds": 1, "federation.baselines": False, "federation.local_iterations": 1}
    results = {}
    for packed in (False, True):
        _, grid, out = tiny_federation(sites=2, heldout=0, overrides=overrides)
        out = out.with_name(f"run-{packed}")
        grid.run_config = {**grid.run_config, "state-dir": str(out / "sites"), "out-dir": str(out)}
        grid.contexts = {n: grid._context(n) for n in grid.node_configs}
        counting = _Counting(grid)
        transport = PackingGrid(counting) if packed else counting
        run_federation(transport, experiment_config(grid.run_config), out, site_state_dir=out / "sites")
        rnd = json.loads((out / "metrics.json").read_text())["rounds"][0]
        assert rnd["aggregated"] and rnd["failures"] == []
        results[packed] = (load_checkpoint(out / "checkpoint.pt")["weights"], counting.arrays)
    (plain, n_plain), (packed, n_packed) = results[False], results[True]
    for key, value in plain.items():
        np.testing.assert_array_equal(packed[key], value, err_msg=key)
    assert n_packed * 20 < n_plain, (n_packed, n_plain)


def test_a_reply_with_a_bad_layout_is_rejected_by_the_screening(tiny_federation, caplog) -> None:
    def garble(node: int, reply: Message) -> Message | None:
        if node == 101 and reply.metadata.message_type == "train" and LAYOUT_RECORD in reply.content:
            reply.content[LAYOUT_RECORD] = ConfigRecord({"arrays": '[["x", [3]]]'})
        return None

    overrides = {"federation.rounds": 1, "federation.baselines": False, "federation.local_iterations": 1}
    _, grid, out = tiny_federation(sites=2, heldout=0, overrides=overrides, intercept=garble)
    with caplog.at_level("WARNING"):
        run_federation(
            PackingGrid(grid), experiment_config(grid.run_config), out, site_state_dir=out / "sites"
        )
    rnd = json.loads((out / "metrics.json").read_text())["rounds"][0]
    assert rnd["aggregated"] and sorted(rnd["train"]) == ["site-a"]
    assert [f["site"] for f in rnd["failures"]] == ["site-b"] and "other than" in rnd["failures"][0]["reason"]
    assert "could not be unpacked" in caplog.text
    weights = load_checkpoint(out / "checkpoint.pt")["weights"]
    assert all(np.isfinite(v).all() for v in weights.values())
    assert isinstance(weights, dict) and ArrayRecord  # keep the import used
