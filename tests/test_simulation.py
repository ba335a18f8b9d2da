"""``genseg-fed simulate``'s engine: real Flower simulations of a tiny torch-free app, errors, cleanup.

The end-to-end tests (``slow``) start a private SuperLink on a free loopback port, run a numpy-only
Flower app written into ``tmp_path`` with 2 virtual SuperNodes, and check that no Flower or Ray process
and no listening port is left behind. Each takes about 15-20 s on 2 CPU cores (mostly Ray start-up).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from genseg_fed import simulation
from genseg_fed.progress import PROGRESS_FILE, ProgressReader, ProgressWriter
from genseg_fed.simulation import (
    COMPLETED,
    SimulationError,
    check_app_dir,
    check_run_config,
    find_app_dir,
    run_simulation,
    write_run_config,
)

REPO = Path(__file__).resolve().parents[1]
tomllib = simulation.tomllib

# A Flower app without torch: the ServerApp reports progress, waits for its nodes, sends them `train`
# messages for `num-rounds` rounds and writes result.json; `mode` makes it fail or hang on purpose.
TINY_APP = {
    "pyproject.toml": """
        [build-system]
        requires = ["hatchling"]
        build-backend = "hatchling.build"

        [project]
        name = "tinyapp"
        version = "0.1.0"
        dependencies = ["flwr[simulation]==1.42.0", "numpy"]

        [tool.hatch.build.targets.wheel]
        packages = ["tinyapp"]

        [tool.flwr.app]
        publisher = "genseg-fed-tests"

        [tool.flwr.app.components]
        serverapp = "tinyapp.server_app:app"
        clientapp = "tinyapp.client_app:app"

        [tool.flwr.app.config]
        mode = "ok"          # ok | server-fail | hang
        num-rounds = 1
        num-nodes = 2
        out-dir = ""
    """,
    "tinyapp/__init__.py": "",
    "tinyapp/server_app.py": '''
        """Tiny ServerApp: progress events, node discovery, `train` rounds, result.json."""

        import json
        import time
        from pathlib import Path

        import numpy as np
        from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
        from flwr.serverapp import Grid, ServerApp

        from genseg_fed.progress import ProgressWriter

        app = ServerApp()


        @app.main()
        def main(grid: Grid, context: Context) -> None:
            cfg = context.run_config
            out = Path(str(cfg["out-dir"]))
            rounds, expected = int(cfg["num-rounds"]), int(cfg["num-nodes"])
            progress = ProgressWriter.in_dir(out)
            progress.start(total=rounds * expected, desc="tiny run")
            t0 = time.time()
            nodes = sorted(grid.get_node_ids())
            while len(nodes) < expected:
                if time.time() - t0 > 60:
                    raise TimeoutError(f"only {len(nodes)} of {expected} nodes after 60 s")
                time.sleep(0.2)
                nodes = sorted(grid.get_node_ids())
            if cfg["mode"] == "server-fail":
                raise RuntimeError("deliberate ServerApp failure in the tiny app")
            while cfg["mode"] == "hang":
                time.sleep(1)
            weights = [np.zeros(3, dtype=np.float32)]
            replies_per_round, first_reply_s = [], None
            for rnd in range(1, rounds + 1):
                msgs = [
                    Message(
                        RecordDict({"arrays": ArrayRecord(weights), "config": ConfigRecord({"round": rnd})}),
                        dst_node_id=node,
                        message_type=MessageType.TRAIN,
                        group_id=str(rnd),
                    )
                    for node in nodes
                ]
                ok = []
                for reply in grid.send_and_receive(msgs, timeout=120):
                    first_reply_s = first_reply_s or time.time() - t0
                    if reply.has_error():
                        raise RuntimeError(f"node error: {reply.error.reason}")
                    ok.append(reply)
                    pid = int(reply.content["metrics"]["partition-id"])
                    progress.step(desc=f"round {rnd}/{rounds} node {pid} train")
                weights = [np.mean([r.content["arrays"].to_numpy_ndarrays()[0] for r in ok], axis=0)]
                replies_per_round.append(len(ok))
            result = {
                "replies": replies_per_round,
                "weights": weights[0].tolist(),
                "serverapp_seconds": time.time() - t0,
                "first_reply_seconds": first_reply_s,
            }
            (out / "result.json").write_text(json.dumps(result))
            progress.done()
    ''',
    "tinyapp/client_app.py": '''
        """Tiny ClientApp: `train` adds 1 + partition-id to the weights."""

        from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
        from flwr.clientapp import ClientApp

        app = ClientApp()


        @app.train()
        def train(msg: Message, context: Context) -> Message:
            pid = int(context.node_config["partition-id"])
            arrays = [a + 1.0 + pid for a in msg.content["arrays"].to_numpy_ndarrays()]
            metrics = MetricRecord({"partition-id": pid, "num-examples": 1})
            return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), reply_to=msg)
    ''',
}


def write_tiny_app(root: Path) -> Path:
    """Write the tiny Flower app into ``root/tinyapp`` and return that folder."""
    app = root / "tinyapp"
    for name, text in TINY_APP.items():
        path = app / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return app


def processes_mentioning(*needles: str) -> dict[int, str]:
    """pid -> command line of live processes whose command line contains one of ``needles``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(needle in cmd for needle in needles):
                found[int(entry.name)] = cmd
    return found


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def superlink_port(out: Path) -> int:
    match = re.search(r"genseg-sim-(\d+)", (out / "flower.log").read_text())
    assert match, "flower.log does not name the SuperLink connection"
    return int(match.group(1))


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The tiny app, an output folder and a private FLWR_HOME; afterwards, checks that nothing is left:
    no process carrying the run's marker, none mentioning the test folder or the port, no listener."""
    if not Path("/proc/self/environ").exists():
        pytest.skip("process checks need Linux /proc")
    markers: list[str] = []
    new_marker = simulation._new_marker
    monkeypatch.setattr(simulation, "_new_marker", lambda: markers.append(new_marker()) or markers[-1])
    app = write_tiny_app(tmp_path)
    out, home = tmp_path / "out", tmp_path / "flwr-home"
    yield app, out, home
    assert markers, "run_simulation did not run"
    port = superlink_port(out)
    left = {pid for marker in markers for pid, _ in simulation._run_processes(marker, [])}
    assert not left, f"processes of the run still alive: {left}"
    assert not processes_mentioning(str(tmp_path), f"--port {port}", f"127.0.0.1:{port}")
    assert not listening(port)
    config = home / "config.toml"
    assert "genseg-sim-" not in (config.read_text() if config.exists() else "")


# ------------------------------------------------------------------------------- end to end (slow)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_run_simulation_completes_and_cleans_up(tiny, capsys: pytest.CaptureFixture[str]) -> None:
    app, out, home = tiny
    home.mkdir()
    user_config = (
        '# my connections\n[superlink]\ndefault = "mine"\n\n[superlink.mine]\naddress = "127.0.0.1:9"\n'
    )
    (home / "config.toml").write_text(user_config)

    result = run_simulation(
        app_dir=app,
        out_dir=out,
        num_supernodes=2,
        run_config={"out-dir": out, "num-rounds": 1, "mode": "ok"},
        flwr_home=home,
        timeout=90,
    )

    assert result.status == COMPLETED and result.details == "N/A"
    assert result.run_id > 0 and result.log_path == out / "flower.log"
    assert json.loads((out / "result.json").read_text())["replies"] == [2]  # both nodes trained
    events = [json.loads(line)["event"] for line in (out / PROGRESS_FILE).read_text().splitlines()]
    assert events == ["start", "step", "step", "done"]
    assert "2/2" in capsys.readouterr().err  # the tqdm bar followed progress.jsonl to the end
    assert (home / "config.toml").read_text() == user_config  # our connection gone, the user's file intact
    assert list((home / "apps").iterdir())  # the SuperLink used this FLWR_HOME
    assert set(result.timings) == {"superlink_start", "run", "status", "teardown"}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_failing_serverapp_raises_with_reason(tiny, caplog: pytest.LogCaptureFixture) -> None:
    app, out, home = tiny
    caplog.set_level("INFO", logger="genseg_fed.simulation.flower")
    with pytest.raises(SimulationError, match="deliberate ServerApp failure") as info:
        run_simulation(
            app_dir=app,
            out_dir=out,
            num_supernodes=2,
            run_config={"out-dir": out, "mode": "server-fail"},
            flwr_home=home,
            progress=False,
            timeout=90,
        )
    assert info.value.status == "finished:failed"
    assert info.value.log_path == out / "flower.log"
    assert "last lines of" in str(info.value) and "\x1b[" not in str(info.value)
    forwarded = [r.getMessage() for r in caplog.records if r.name == "genseg_fed.simulation.flower"]
    assert any("deliberate ServerApp failure" in line for line in forwarded)  # progress=False: log, no bar


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_timeout_stops_everything(tiny) -> None:
    app, out, home = tiny
    with pytest.raises(SimulationError, match="timed out after 10 s"):
        run_simulation(
            app_dir=app,
            out_dir=out,
            num_supernodes=2,
            run_config={"out-dir": out, "mode": "hang"},
            flwr_home=home,
            timeout=10,
        )


# ------------------------------------------------------------------------------------- fast checks


def test_find_app_dir_is_the_checkout() -> None:
    assert find_app_dir() == REPO


def test_find_app_dir_outside_a_checkout_says_what_to_do(tmp_path: Path) -> None:
    package = tmp_path / "site-packages" / "genseg_fed"
    package.mkdir(parents=True)
    with pytest.raises(SimulationError, match=r"simulate needs the source checkout.*pass --app"):
        find_app_dir(package)


def test_check_app_dir_needs_flower_components(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    with pytest.raises(SimulationError, match="serverapp"):
        check_app_dir(tmp_path)
    assert check_app_dir(write_tiny_app(tmp_path)) == (tmp_path / "tinyapp").resolve()
    nested = tmp_path / "nested"
    nested.mkdir()
    (nested / "pyproject.toml").write_text(
        '[tool.flwr.app.components]\nserverapp = "a:b"\nclientapp = "a:c"\n'
        "[tool.flwr.app.config]\nrounds = 1\n[tool.flwr.app.config.model]\ndepth = 4\n"
    )
    check_run_config(nested, {"rounds": 2, "model.depth": 3})  # tables flatten to dotted keys, like Flower


def test_unknown_run_config_key_is_named_before_anything_starts(tmp_path: Path) -> None:
    app = write_tiny_app(tmp_path)
    with pytest.raises(
        SimulationError, match=r"\['no-such-key'\] are not in .*known keys: \['mode', 'num-nodes'"
    ):
        run_simulation(app_dir=app, out_dir=tmp_path / "out", num_supernodes=2, run_config={"no-such-key": 1})
    assert not (tmp_path / "out").exists()


def test_run_config_file_is_flat_toml_with_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = write_run_config(
        {
            "out-dir": Path("runs/x"),
            "note": 'a "quoted" path with spaces',
            "num-rounds": 3,
            "lr": 1e-3,
            "dp": True,
            "model.depth": 4,
        },
        tmp_path / "rc.toml",
    )
    assert tomllib.loads(path.read_text()) == {
        "out-dir": str(tmp_path / "runs" / "x"),
        "note": 'a "quoted" path with spaces',
        "num-rounds": 3,
        "lr": 1e-3,
        "dp": True,
        "model.depth": 4,
    }
    with pytest.raises(TypeError, match="'bad'"):
        write_run_config({"bad": None}, tmp_path / "bad.toml")  # type: ignore[dict-item]


@pytest.mark.parametrize(
    "existing",
    [
        None,  # no config.toml: we create one, without Flower's auto-starting "local" default
        '# mine\n[superlink]\ndefault = "mine"\n\n[superlink.mine]\naddress = "127.0.0.1:1"\ninsecure = true',
        'superlink.mine.address = "127.0.0.1:1"\n',  # dotted keys: merged as data instead of appended
    ],
)
def test_flower_connection_is_added_then_removed(tmp_path: Path, existing: str | None) -> None:
    config = tmp_path / "config.toml"
    if existing is not None:
        config.write_text(existing)
    with simulation._flower_connection(tmp_path, "genseg-sim-1234", "127.0.0.1:1234"):
        data = tomllib.loads(config.read_text())
        assert data["superlink"]["genseg-sim-1234"] == {"address": "127.0.0.1:1234", "insecure": True}
        if existing:
            assert data["superlink"]["mine"]["address"] == "127.0.0.1:1"
    after = tomllib.loads(config.read_text())
    assert "genseg-sim-1234" not in after["superlink"]
    if existing is None:
        assert after == {"superlink": {}}
    elif existing.startswith("#"):
        assert config.read_text() == existing + "\n"  # the user's text, comments included
    else:
        assert after == tomllib.loads(existing)


def test_stale_connections_of_killed_runs_are_dropped(tmp_path: Path) -> None:
    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen()
        live_port = live.getsockname()[1]
        dead_port = simulation._free_port()
        stale = simulation._connection_block(f"genseg-sim-{dead_port}", f"127.0.0.1:{dead_port}")
        running = simulation._connection_block(f"genseg-sim-{live_port}", f"127.0.0.1:{live_port}")
        (tmp_path / "config.toml").write_text("[superlink]\n" + stale + running)
        with simulation._flower_connection(tmp_path, "genseg-sim-1", "127.0.0.1:1"):
            pass
        assert (tmp_path / "config.toml").read_text() == "[superlink]\n" + running  # another live run's kept


def test_progress_display_follows_events_and_forwards_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    display = simulation._ProgressDisplay(tmp_path, tmp_path / "flower.log", progress=True)
    writer = ProgressWriter.in_dir(tmp_path)
    writer.start(4, desc="federated GenSeg", done=1)  # resumed after one step
    writer.step(desc="round 1/2 hospital-a train", n=2)
    display.poll()
    assert display.bar is not None and (display.bar.n, display.bar.total) == (3, 4)
    writer.done()
    display.close()
    assert "4/4" in capsys.readouterr().err

    with caplog.at_level("INFO", logger="genseg_fed.simulation.flower"):
        quiet = simulation._ProgressDisplay(tmp_path, tmp_path / "flower.log", progress=False)
        quiet.poll()  # no log yet
        with (tmp_path / "flower.log").open("a") as f:
            f.write("\x1b[92mINFO \x1b[0m:      round 1\n\x1b[92mINFO \x1b[0m:      rou")
        quiet.close()
    assert [r.getMessage() for r in caplog.records] == ["INFO :      round 1"]  # whole lines, no colours


def fake_flower_bin(tmp_path: Path, script: str) -> Path:
    """A bin folder whose ``flower-superlink`` runs ``script`` (bash)."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    exe = bin_dir / "flower-superlink"
    exe.write_text("#!/bin/bash\n" + script)
    exe.chmod(0o755)
    (bin_dir / "flwr").write_text("#!/bin/bash\nexit 1\n")
    (bin_dir / "flwr").chmod(0o755)
    return bin_dir


def test_superlink_that_dies_at_start_is_reported_with_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = fake_flower_bin(tmp_path, 'echo "ImportError: no module named flwr.superlink"\nexit 3\n')
    monkeypatch.setattr(simulation, "_bin_dir", lambda: bin_dir)
    out = tmp_path / "out"
    with pytest.raises(SimulationError, match=r"(?s)exited during start-up \(exit code 3\).*no module named"):
        run_simulation(
            app_dir=write_tiny_app(tmp_path), out_dir=out, num_supernodes=2, run_config={}, flwr_home=tmp_path
        )
    assert (
        not (tmp_path / "config.toml").exists() or "genseg-sim-" not in (tmp_path / "config.toml").read_text()
    )


def test_port_taken_meanwhile_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = tmp_path / "calls"
    bin_dir = fake_flower_bin(
        tmp_path, f'echo x >> {calls}\necho "[Errno 98] address already in use"\nexit 1\n'
    )
    monkeypatch.setattr(simulation, "_bin_dir", lambda: bin_dir)
    with pytest.raises(SimulationError, match="address already in use"):
        run_simulation(
            app_dir=write_tiny_app(tmp_path),
            out_dir=tmp_path / "out",
            num_supernodes=1,
            run_config={},
            flwr_home=tmp_path,
        )
    assert len(calls.read_text().splitlines()) == 3


def test_teardown_kills_marked_processes_that_ignore_sigterm(tmp_path: Path) -> None:
    if not Path("/proc/self/environ").exists():
        pytest.skip("needs Linux /proc")
    marker = simulation._new_marker()
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    env = {**os.environ, simulation.MARKER_ENV: marker}
    # detached (own session) like Flower's SuperExec: found by its marker, not by its parent
    proc = subprocess.Popen([sys.executable, "-c", stubborn], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not simulation._run_processes(marker, []) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert {pid for pid, _ in simulation._run_processes(marker, [])} == {proc.pid}
        time.sleep(0.3)  # let it install its SIGTERM handler
        simulation._stop_run_processes(None, None, marker, grace=0.1)
        assert proc.wait(timeout=5) == -signal.SIGKILL
        assert not simulation._run_processes(marker, [])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_progress_reader_tolerates_missing_file_and_partial_lines(tmp_path: Path) -> None:
    path = tmp_path / PROGRESS_FILE
    reader = ProgressReader(path)
    assert reader.read() == []  # no file yet
    ProgressWriter(path).start(3, desc="run")
    with path.open("a") as f:
        f.write('{"event": "step", "n"')  # a line still being written
    assert [e["event"] for e in reader.read()] == ["start"]
    with path.open("a") as f:
        f.write(': 2, "desc": "round 1"}\nnot json\n')
    assert reader.read() == [{"event": "step", "n": 2, "desc": "round 1"}]
    path.write_text('{"event": "done"}\n')  # rewritten (shorter): read again from the start
    assert reader.read() == [{"event": "done"}]
    ProgressWriter(None).step()  # a writer without a path does nothing
    ProgressWriter.in_dir("").done()
