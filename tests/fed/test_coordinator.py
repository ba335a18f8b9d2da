"""The coordinator with real ClientApps: rounds, failures, bad updates, resume, what crosses the wire."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict

from genseg_fed.checkpoint import load_checkpoint
from genseg_fed.fed.protocol import record_to_weights, weights_to_record
from genseg_fed.fed.runconfig import experiment_config
from server.federation import FederationError, run_federation


def _run(grid, out: Path, *, resume: bool = False) -> Path:
    cfg = experiment_config(grid.run_config)
    return run_federation(grid, cfg, out, resume=resume, site_state_dir=out / "sites")


def test_two_sites_two_rounds_write_report_matrix_and_change_the_model(tiny_federation) -> None:
    _, grid, out = tiny_federation()
    report = _run(grid, out)
    assert (
        report.is_file() and (out / "dice_per_round.png").is_file() and (out / "crosssite_dice.png").is_file()
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert all(r["aggregated"] and r["update_norm"] > 0 for r in metrics["rounds"])
    cross = metrics["crosssite"]
    assert cross["models"] == ["global", "local:site-a", "local:site-b"]
    assert cross["sites"] == ["site-a", "site-b", "site-c"] and cross["heldout"] == ["site-c"]
    assert np.isfinite(np.array(cross["dice"], dtype=float)).all()
    assert set(metrics["rounds"][-1]["evaluate"]) == {"site-a", "site-b", "site-c"}
    text = report.read_text()
    assert "site-c (held-out)" in text and "Cross-site" in text


def test_clients_send_only_shared_weights_and_scalar_metrics(tiny_federation) -> None:
    _, grid, out = tiny_federation()
    _run(grid, out)
    allowed_prefixes = ("segmenter/", "generator/")
    identity_keys = {"name", "role", "description", "simulated-shift"}
    kinds = set()
    for _node, reply in grid.sent:
        assert not reply.has_error()
        content = reply.content
        kinds.add(reply.metadata.message_type)
        for rec_name, rec in content.array_records.items():
            for key, arr in rec.items():
                assert key.startswith(allowed_prefixes), f"{rec_name}/{key} is not a shared weight"
                assert "discriminator" not in key
                # no image-like tensor (N, C, H, W) of the site's data: weights are at most 4-D with
                # kernel-sized spatial dims
                shape = arr.shape
                assert not (len(shape) == 4 and shape[-1] >= 16), f"{key} has an image-like shape {shape}"
        for rec in content.metric_records.values():
            for key, value in rec.items():
                assert isinstance(value, (int, float)), f"metric {key} is not a scalar"
        for rec_name, rec in content.config_records.items():
            assert rec_name == "site" and set(rec) == identity_keys, "only the site identity may be text"
    assert kinds == {"query", "train", "train.baseline", "evaluate"}


def test_a_failing_site_is_recorded_and_the_round_completes(tiny_federation) -> None:
    def fail_site_b_training(node: int, reply: Message) -> Message | None:
        if node == 101 and reply.metadata.message_type == "train":
            return _error_reply(reply, "RuntimeError: disk full at site-b")
        return None

    _, grid, out = tiny_federation(intercept=fail_site_b_training)
    _run(grid, out)
    metrics = json.loads((out / "metrics.json").read_text())
    for rnd in metrics["rounds"]:
        assert rnd["aggregated"], "the round must complete with the remaining site"
        assert set(rnd["train"]) == {"site-a"}
        assert rnd["failures"] == [
            {"site": "site-b", "stage": "train", "reason": "RuntimeError: disk full at site-b"}
        ]
    assert "disk full" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ("nan", "non-finite"),
        ("shape", "wrong shape"),
        ("keys", "wrong keys"),
        ("extra", "other than the shared weights"),
    ],
)
def test_bad_updates_are_rejected_and_do_not_touch_the_model(
    tiny_federation, tamper: str, reason: str
) -> None:
    def poison(node: int, reply: Message) -> Message | None:
        if node != 101 or reply.metadata.message_type != "train":
            return None
        weights = record_to_weights(reply.content.array_records["arrays"])
        key = next(k for k in weights if k.startswith("segmenter/"))
        if tamper == "nan":
            weights[key] = np.full_like(weights[key], np.nan)
        elif tamper == "shape":
            weights[key] = np.zeros((3, 3), np.float32)
        elif tamper == "keys":
            weights["segmenter/backdoor"] = weights.pop(key)
        content = RecordDict(
            {"arrays": weights_to_record(weights), "metrics": reply.content.metric_records["metrics"]}
        )
        if tamper == "extra":
            content["images"] = ConfigRecord({"leak": "x"})
        return _replace_content(reply, content)

    _, grid, out = tiny_federation(intercept=poison, overrides={"federation.rounds": 1})
    _run(grid, out)
    metrics = json.loads((out / "metrics.json").read_text())
    (rnd,) = metrics["rounds"]
    assert rnd["aggregated"] and set(rnd["train"]) == {"site-a"}
    assert len(rnd["failures"]) == 1 and reason in rnd["failures"][0]["reason"]
    weights = load_checkpoint(out / "checkpoint.pt")["weights"]
    assert all(np.isfinite(v).all() for v in weights.values())


def test_too_few_sites_is_a_clear_error(tiny_federation) -> None:
    _, grid, out = tiny_federation(overrides={"federation.min_sites": 3})
    with pytest.raises(FederationError, match=r"2 of 2 training sites connected.*at least 3 required"):
        _run(grid, out)


def test_resume_continues_at_the_next_round_with_identical_weights(tiny_federation) -> None:
    # Uninterrupted reference run.
    _, grid_ref, out_ref = tiny_federation(overrides={"federation.baselines": False})
    _run(grid_ref, out_ref)
    reference = load_checkpoint(out_ref / "checkpoint.pt")["weights"]

    # Same experiment, coordinator killed during round 2.
    _, grid, out = tiny_federation(overrides={"federation.baselines": False})
    out = out.with_name("run2")
    grid.run_config = {**grid.run_config, "state-dir": str(out / "sites")}
    grid.contexts = {n: grid._context(n) for n in grid.node_configs}
    push = grid.push_messages

    def killed_in_round_2(messages):
        messages = list(messages)
        if any(m.content.config_records.get("config", {}).get("server-round") == 2 for m in messages):
            raise KeyboardInterrupt("coordinator killed")
        return push(messages)

    grid.push_messages = killed_in_round_2
    with pytest.raises(KeyboardInterrupt):
        _run(grid, out)
    after_round_1 = load_checkpoint(out / "checkpoint.pt")
    assert after_round_1["round"] == 1

    grid.push_messages = push
    _run(grid, out, resume=True)
    final = load_checkpoint(out / "checkpoint.pt")
    assert final["round"] == 2 and final["history"]["run"]["resumed_at_round"] == [1]
    assert [r["round"] for r in final["history"]["rounds"]] == [1, 2]
    for key, value in reference.items():
        np.testing.assert_array_equal(final["weights"][key], value, err_msg=key)


def _error_reply(reply: Message, reason: str) -> Message:
    return _as_node(reply, lambda req: Message(Error(code=2, reason=reason), reply_to=req))


def _fake_request(reply: Message) -> Message:
    """A request whose reply would come from the same node (to forge replies in tests)."""
    req = Message(
        RecordDict(), dst_node_id=reply.metadata.src_node_id, message_type=reply.metadata.message_type
    )
    req.metadata.__dict__["_message_id"] = reply.metadata.reply_to_message_id
    req.metadata.__dict__["_src_node_id"] = reply.metadata.dst_node_id
    return req


def _replace_content(reply: Message, content: RecordDict) -> Message:
    return _as_node(reply, lambda req: Message(content, reply_to=req))


def _as_node(reply: Message, make):
    """Build a forged reply as the node that sent ``reply`` would."""
    from flwr.supercore.task_identity import TaskIdentity

    previous = TaskIdentity.node_id
    TaskIdentity.node_id = reply.metadata.src_node_id
    try:
        return make(_fake_request(reply))
    finally:
        TaskIdentity.node_id = previous


def test_a_site_whose_data_disappears_fails_clearly_and_the_run_goes_on(tiny_federation) -> None:
    import shutil

    cfg, grid, out = tiny_federation(overrides={"federation.baselines": False})
    site_b = Path(cfg["data"]["sites"][1]["path"])
    push = grid.push_messages

    def remove_site_b_after_round_1(messages):
        messages = list(messages)
        if any(m.content.config_records.get("config", {}).get("server-round") == 2 for m in messages):
            shutil.rmtree(site_b, ignore_errors=True)
        return push(messages)

    grid.push_messages = remove_site_b_after_round_1
    _run(grid, out)
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert rounds[0]["failures"] == []
    train_failures = [f for f in rounds[1]["failures"] if f["stage"] == "train"]
    assert [f["site"] for f in train_failures] == ["site-b"]
    assert "does not exist" in train_failures[0]["reason"]
    assert rounds[1]["aggregated"] and set(rounds[1]["train"]) == {"site-a"}
