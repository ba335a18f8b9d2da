"""The real deployment on loopback: a TLS SuperLink with SuperNode authentication, three hospitals.

One federation serves the whole module (starting it costs more than a run): ``genseg-fed superlink`` on
a free 127.0.0.1 port with TLS and SuperNode authentication, three registered hospitals, each a
``genseg-fed supernode`` with its own key, data folder, state folder and Flower home (with the warm
ClientApp runner; the refused intruders run the plain ``flower-supernode``), and the real ServerApp
and ClientApp. Runs are submitted with ``flwr run`` and judged by their status from
``flwr ls --format json``.

Order matters and is the file order: the happy path, two refused intruders, a hospital killed in the
middle of a round, and last the coordinator killed after round 1 (which restarts the SuperLink).
Every process is stopped at the end (also on failure) and the test checks that none is left.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from genseg_fed.deploy.certs import create_node_keys, create_superlink_certs
from genseg_fed.deploy.local import LocalFederation, read_metrics

pytestmark = pytest.mark.slow

SITES = ("site-a", "site-b")
RUN_TIMEOUT = 600.0
FAST = "federation.local_iterations=1;federation.baselines=false"


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, experiment_writer) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("deploy")
    experiment = experiment_writer(root / "exp", sites=len(SITES), heldout=0)
    federation = LocalFederation(root / "fed")
    federation.experiment = experiment  # type: ignore[attr-defined]
    federation.data = {s: root / "exp" / "data" / s for s in SITES}  # type: ignore[attr-defined]
    try:
        federation.make_certs(SITES)
        federation.start_superlink()
        federation.node_ids = {s: federation.register(s) for s in SITES}  # type: ignore[attr-defined]
        for site in SITES:
            federation.start_supernode(site, federation.data[site])  # type: ignore[attr-defined]
        yield federation
    finally:
        federation.close()
    left = {r.name: r.processes() for r in (*federation.sites.values(), federation.coordinator)}
    assert not any(left.values()), f"processes left behind: {left}"
    with socket.socket() as s:  # nothing listens on the SuperLink's port any more
        assert s.connect_ex(("127.0.0.1", federation.port)) != 0


def _all_online(fed: LocalFederation) -> None:
    nodes = fed.wait_online(len(SITES), timeout=120)
    assert all(nodes.get(fed.node_ids[s]) == "online" for s in SITES), nodes  # type: ignore[attr-defined]


def _unsigned_acquire_task(port: int) -> int:
    """HTTP status of an AcquireTask call without the SuperNode's secret (plain httpx: no retries)."""
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.protobuf.constants import PROTOBUF_MEDIA_TYPE

    body = AcquireTaskRequest(supported_task_types=["flwr-clientapp"]).SerializeToString()
    headers = {"content-type": PROTOBUF_MEDIA_TYPE, "accept": PROTOBUF_MEDIA_TYPE}
    url = f"http://127.0.0.1:{port}/v1/runtime/acquire-task"
    return httpx.post(url, content=body, headers=headers, trust_env=False, timeout=10).status_code


def _run(fed: LocalFederation, out: Path, overrides: str, **extra: object) -> tuple[int, dict]:
    run_id = fed.submit({"config": str(fed.experiment), "out-dir": str(out), "overrides": overrides, **extra})  # type: ignore[attr-defined]
    return run_id, fed.wait(run_id, RUN_TIMEOUT)


def test_two_rounds_over_tls_with_authenticated_supernodes(fed: LocalFederation, tmp_path: Path) -> None:
    _all_online(fed)
    out = tmp_path / "run"
    _, info = _run(fed, out, f"federation.rounds=2;{FAST}")
    assert info["status"] == "finished:completed", (info, fed.log_text()[-3000:])
    metrics = read_metrics(out)
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for rnd in rounds:
        assert rnd["aggregated"] and rnd["update_norm"] > 0 and rnd["failures"] == []
        assert sorted(rnd["train"]) == list(SITES) and sorted(rnd["evaluate"]) == list(SITES)
    cross = metrics["crosssite"]
    assert cross["sites"] == list(SITES) and np.isfinite(np.array(cross["dice"], dtype=float)).all()
    assert (out / "report.md").is_file() and (out / "checkpoint.pt").is_file()
    # It really was TLS with SuperNode authentication, and every hospital's own data and state.
    superlink_log = fed.log_text()
    assert (
        "--enable-supernode-auth" in superlink_log and "Uvicorn running on https://127.0.0.1" in superlink_log
    )
    for site in SITES:
        log = fed.log_text(site)
        assert f'data-path="{fed.data[site]}"' in log  # type: ignore[attr-defined]
        assert any((fed.root / "sites" / site / "state").rglob("round-0002.pt")), site
    assert "warm ClientApp runner" in fed.log_text("site-b")
    # Another local process cannot take a hospital's tasks from its Runtime API (shared-secret HMAC).
    assert _unsigned_acquire_task(fed.sites["site-a"].extra["port"]) == 401


def test_supernode_with_the_wrong_ca_is_refused(fed: LocalFederation, tmp_path: Path) -> None:
    other = create_superlink_certs(tmp_path / "other-ca")
    (pair,) = create_node_keys(fed.keys_dir, ["wrong-ca"])
    node_id = fed.register("wrong-ca")  # registered: the CA is the only thing wrong
    proc = fed.start_supernode("wrong-ca", None, key=pair.private_key, ca=other.ca_cert, warm=False)
    assert proc.wait(timeout=120) != 0
    log = fed.log_text("wrong-ca")
    assert "CERTIFICATE_VERIFY_FAILED" in log and "could not establish a connection" in log
    assert fed.nodes()[node_id] == "registered"  # never online


def test_unregistered_key_is_refused(fed: LocalFederation) -> None:
    (pair,) = create_node_keys(fed.keys_dir, ["unregistered"])
    before = fed.nodes()
    proc = fed.start_supernode("unregistered", None, key=pair.private_key, warm=False)
    assert proc.wait(timeout=120) != 0
    assert "Failed to activate SuperNode" in fed.log_text("unregistered")
    assert "No SuperNode found with the given public key" in fed.log_text()
    assert fed.nodes() == before


def test_hospital_killed_mid_round_is_recorded_and_rejoins_next_round(
    fed: LocalFederation, tmp_path: Path
) -> None:
    """SIGKILL a hospital while it trains round 1 and restart it at once (same key, same state): round 1
    completes with the other hospital, the report names the dead one, and the restarted one trains again.

    Round 1 gives up on the killed instance after ``round_timeout`` (its message died with it), or earlier
    if the SuperLink has already declared the node unavailable (missed heartbeats, when the restart was
    slow); either way the failure is recorded and the round goes on."""
    _all_online(fed)
    victim, timeout = "site-b", 45
    out = tmp_path / "run"
    seen = fed.log_text(victim).count("Receiving: train message")
    overrides = (
        f"federation.rounds=3;{FAST};federation.local_iterations=10;"  # 10: the kill lands mid-training
        f"federation.min_sites=1;federation.round_timeout={timeout}"
    )
    run_id = fed.submit({"config": str(fed.experiment), "out-dir": str(out), "overrides": overrides})  # type: ignore[attr-defined]
    deadline = time.monotonic() + 300
    while fed.log_text(victim).count("Receiving: train message") == seen:  # it is training round 1
        assert time.monotonic() < deadline, f"{victim} never received its round-1 training message"
        time.sleep(0.2)
    fed.kill_supernode(victim)  # SIGKILL: no goodbye to the SuperLink, which still lists it as online
    fed.start_supernode(victim, fed.data[victim])  # type: ignore[attr-defined] # same key, same state
    info = fed.wait(run_id, RUN_TIMEOUT)
    assert info["status"] == "finished:completed", info
    first, *later = read_metrics(out)["rounds"]
    assert first["aggregated"] and sorted(first["train"]) == ["site-a"]  # the round went on without it
    (failure,) = [f for f in first["failures"] if f["stage"] == "train"]
    assert failure["site"] == victim
    assert failure["reason"] in (f"no reply within {timeout} s",) or "Node Unavailable" in failure["reason"]
    assert all(r["aggregated"] for r in later)
    assert any(sorted(r["train"]) == list(SITES) for r in later), later  # it is back
    assert later[-1]["failures"] == []
    assert victim in (out / "report.md").read_text().split("## Failures")[1]
    progress = (out / "progress.jsonl").read_text()
    assert f"round 1/3: {victim} failed" in progress or f"round 1: {victim} did not reply" in progress


def test_a_restarted_hospital_is_back_at_once(fed: LocalFederation) -> None:
    """After a crash the SuperLink still lists the node as online (until two 30 s heartbeats are missed)
    and refuses to activate it again; the restarted SuperNode closes that stale session and connects."""
    _all_online(fed)
    site = "site-a"
    fed.kill_supernode(site)
    proc = fed.start_supernode(site, fed.data[site])  # type: ignore[attr-defined]
    deadline = time.monotonic() + 60
    while "SuperNode ID:" not in fed.log_text(site).rsplit("==== ", 1)[1]:
        assert proc.poll() is None, fed.log_text(site)[-2000:]  # e.g. "Failed to activate SuperNode"
        assert time.monotonic() < deadline
        time.sleep(0.5)
    new_log = fed.log_text(site).rsplit("==== ", 1)[1]
    assert "closed that session" in new_log
    assert f"SuperNode ID: {fed.node_ids[site]}" in new_log  # type: ignore[attr-defined]
    assert fed.nodes()[fed.node_ids[site]] == "online"  # type: ignore[attr-defined]


def test_coordinator_killed_after_round_1_resumes_at_round_2(fed: LocalFederation, tmp_path: Path) -> None:
    _all_online(fed)
    out = tmp_path / "run"
    overrides = f"federation.rounds=2;{FAST}"
    run_id = fed.submit({"config": str(fed.experiment), "out-dir": str(out), "overrides": overrides})  # type: ignore[attr-defined]
    deadline = time.monotonic() + RUN_TIMEOUT
    while len(read_metrics(out).get("rounds", [])) < 1:
        assert time.monotonic() < deadline, fed.log_text()[-3000:]
        time.sleep(0.2)
    fed.kill_coordinator()  # SuperLink, SuperExec and ServerApp, all at once (SIGKILL)
    saved = read_metrics(out)
    assert [r["round"] for r in saved["rounds"]] == [1]

    fed.start_superlink()  # same port, same database: registrations survive, hospitals reconnect
    _all_online(fed)
    _, info = _run(fed, out, overrides, resume=True)
    assert info["status"] == "finished:completed", info
    final = read_metrics(out)
    assert [r["round"] for r in final["rounds"]] == [1, 2]
    assert final["run"]["resumed_at_round"] == [1] and final["run"]["run_key"] == saved["run"]["run_key"]
    assert json.dumps(final["rounds"][0], sort_keys=True) == json.dumps(saved["rounds"][0], sort_keys=True)
    assert sorted(final["rounds"][1]["train"]) == list(SITES) and final["rounds"][1]["aggregated"]
    # The killed run never reports success. The restarted SuperLink marks it finished:failed once the
    # dead ServerApp's heartbeat expires, which may be after the resumed run has already finished.
    assert fed.status(run_id)["status"] in ("running", "finished:failed")
