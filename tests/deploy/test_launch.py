"""Deployment commands without starting Flower: validation, secure defaults, the exact command lines."""

from __future__ import annotations

import logging
import shlex
import sys
import tomllib
from pathlib import Path

import pytest

from genseg_fed.cli import main
from genseg_fed.deploy import launch, runner, supernode
from genseg_fed.deploy.certs import create_node_keys, create_superlink_certs
from genseg_fed.deploy.launch import (
    DeployError,
    SuperLinkOptions,
    SuperNodeOptions,
    offline_env,
    read_connection,
    superlink_command,
    supernode_command,
    write_connection,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def material(tmp_path: Path) -> dict[str, Path]:
    certs = create_superlink_certs(tmp_path / "certs", sans=["fl.example.org"])
    (pair,) = create_node_keys(tmp_path / "keys", ["hospital-a"])
    site = tmp_path / "site"
    (site / "images").mkdir(parents=True)
    (site / "masks").mkdir()
    return {
        "certs": certs.cert.parent,
        "ca": certs.ca_cert,
        "key": pair.private_key,
        "site": site,
        "tmp": tmp_path,
    }


def test_superlink_is_tls_with_supernode_auth_by_default(material: dict[str, Path]) -> None:
    cmd = superlink_command(SuperLinkOptions(certs=material["certs"], host="fl.example.org", port=9092))
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd
    assert cmd[cmd.index("--ssl-certfile") + 1].endswith("superlink.crt")
    assert "--disable-runtime-dependency-installation" in cmd


def test_superlink_refuses_a_host_its_certificate_does_not_name(material: dict[str, Path]) -> None:
    with pytest.raises(DeployError, match=r"does not name '10\.9\.9\.9'.*--reuse-ca"):
        superlink_command(SuperLinkOptions(certs=material["certs"], host="10.9.9.9"))


def test_insecure_superlink_only_when_asked_and_with_a_warning(
    material: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(DeployError, match="needs --certs"):
        superlink_command(SuperLinkOptions(certs=None))
    with pytest.raises(DeployError, match="authentication needs TLS"):
        superlink_command(SuperLinkOptions(certs=None, insecure=True))
    with caplog.at_level(logging.WARNING):
        cmd = superlink_command(SuperLinkOptions(certs=None, insecure=True, supernode_auth=False))
    assert "--insecure" in cmd and "INSECURE" in caplog.text


def test_supernode_command_carries_site_data_and_state(material: dict[str, Path]) -> None:
    opts = SuperNodeOptions(
        superlink="fl.example.org:9092",
        site_name="hospital-a",
        state_dir=material["tmp"] / "state dir",
        data_path=material["site"],
        ca_cert=material["ca"],
        key=material["key"],
    )
    cmd = supernode_command(opts)
    config = cmd[cmd.index("--node-config") + 1]
    from flwr.common.config import parse_config_args

    assert parse_config_args([config]) == {
        "site-name": "hospital-a",
        "data-path": str(material["site"].resolve()),
        "state-dir": str((material["tmp"] / "state dir").resolve()),
    }
    assert cmd[cmd.index("--root-certificates") + 1] == str(material["ca"].resolve())
    assert "--auth-supernode-private-key" in cmd and cmd[cmd.index("--isolation") + 1] == "process"
    assert "--isolation" not in supernode_command(SuperNodeOptions(**{**opts.__dict__, "warm": False}))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ca_cert": None}, "TLS needs --ca"),
        ({"key": None}, "pass --key"),
        ({"superlink": "fl.example.org"}, "HOST:PORT"),
        ({"data_path": Path("/nonexistent")}, "has no images/"),
        ({"site_name": 'a"b'}, "must not contain"),
    ],
)
def test_supernode_refuses_incomplete_or_unsafe_settings(
    material: dict[str, Path], change: dict, message: str
) -> None:
    opts = dict(
        superlink="127.0.0.1:9092",
        site_name="hospital-a",
        state_dir=material["tmp"] / "state",
        data_path=material["site"],
        ca_cert=material["ca"],
        key=material["key"],
    )
    with pytest.raises(DeployError, match=message):
        supernode_command(SuperNodeOptions(**{**opts, **change}))


def test_supernode_refuses_a_key_others_can_read(material: dict[str, Path]) -> None:
    material["key"].chmod(0o640)
    opts = SuperNodeOptions(
        "127.0.0.1:9092", "hospital-a", material["tmp"], ca_cert=material["ca"], key=material["key"]
    )
    with pytest.raises(DeployError, match="chmod 600"):
        supernode_command(opts)


def test_offline_environment_for_every_flower_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "1")
    env = offline_env(tmp_path)
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1" and env["FLWR_HOME"] == str(tmp_path)
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    monkeypatch.setenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "1.0")  # an explicit choice is kept
    assert offline_env(tmp_path)["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "1.0"


def test_connection_is_written_for_the_flwr_cli_and_keeps_others(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(
        '[superlink]\ndefault = "mine"\n[superlink.mine]\naddress = "x:1"\n'
    )
    write_connection(tmp_path, "genseg", "fl.example.org:9092", ca_cert=tmp_path / "ca.crt")
    data = tomllib.loads((tmp_path / "config.toml").read_text())
    assert data["superlink"]["default"] == "mine" and data["superlink"]["mine"] == {"address": "x:1"}
    assert read_connection(tmp_path, "genseg") == {
        "address": "fl.example.org:9092",
        "root-certificates": str((tmp_path / "ca.crt").resolve()),
    }
    write_connection(tmp_path / "new", "genseg", "127.0.0.1:9092", ca_cert=None)
    fresh = tomllib.loads((tmp_path / "new" / "config.toml").read_text())
    assert fresh["superlink"] == {
        "default": "genseg",
        "genseg": {"address": "127.0.0.1:9092", "insecure": True},
    }
    with pytest.raises(DeployError, match=r"no connection \[superlink.other\]"):
        read_connection(tmp_path, "other")


def test_cli_dry_runs_print_the_commands(
    material: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    state = material["tmp"] / "coordinator"
    home = material["tmp"] / "home"
    superlink = [
        "superlink",
        "--certs",
        str(material["certs"]),
        "--state-dir",
        str(state),
        "--flwr-home",
        str(home),
    ]
    assert main([*superlink, "--dry-run"]) == 0
    out = capsys.readouterr().out
    command = shlex.split(out.split("command: ")[1].splitlines()[0])
    assert Path(command[0]).name == "flower-superlink" and "--enable-supernode-auth" in command
    assert f"FLWR_HOME={home}" in out and not home.exists()  # a dry run writes nothing
    args = [
        "supernode",
        "--superlink",
        "127.0.0.1:9092",
        "--ca",
        str(material["ca"]),
        "--key",
        str(material["key"]),
    ]
    args += ["--site-name", "hospital-a", "--data", str(material["site"]), "--state-dir", str(state / "site")]
    assert main([*args, "--dry-run"]) == 0
    command = shlex.split(capsys.readouterr().out.split("command: ")[1].splitlines()[0])
    assert command[1:3] == ["-m", "genseg_fed.deploy.supernode"] and "--isolation" in command
    assert main([*args, "--plain", "--dry-run"]) == 0
    command = shlex.split(capsys.readouterr().out.split("command: ")[1].splitlines()[0])
    assert Path(command[0]).name == "flower-supernode"
    assert main(["supernode", "--superlink", "127.0.0.1:9092", "--site-name", "a", "--dry-run"]) == 2
    assert "TLS needs --ca" in capsys.readouterr().err


def test_flower_internals_the_speed_ups_rely_on_exist() -> None:
    """The warm runner and the SuperNode patches use Flower 1.42 internals: fail loudly if they move."""
    from flwr.supernode import start_client_internal
    from flwr.supernode.runtime import run_clientapp

    assert hasattr(start_client_internal, "time") and start_client_internal.time.sleep
    assert callable(run_clientapp.pull_and_inflate_object_from_tree) and callable(run_clientapp.run_clientapp)
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # noqa: F401
    from flwr.supercore.runtime import RuntimeHttpClient  # noqa: F401
    from flwr.supernode.fleet_http_client import FleetHttpClient  # noqa: F401
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor  # noqa: F401


def test_idle_poll_patch_caps_only_the_supernode_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from flwr.supernode import start_client_internal

    monkeypatch.setattr(start_client_internal, "time", time)
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    supernode.patch_idle_poll(0.5)
    start_client_internal.time.sleep(3)
    start_client_internal.time.sleep(0.2)
    assert slept == [0.5, 0.2] and start_client_internal.time is not time
    with pytest.raises(ValueError):
        supernode.patch_idle_poll(10)


def test_runner_keeps_app_packages_out_of_the_warm_process() -> None:
    import types

    sys.modules["genseg_fed_fake"] = types.ModuleType("genseg_fed_fake")
    sys.modules["client.fake"] = types.ModuleType("client.fake")
    try:
        runner._purge_app_modules(("client",))
        assert "client.fake" not in sys.modules and "genseg_fed_fake" in sys.modules
    finally:
        sys.modules.pop("genseg_fed_fake", None)
    assert runner.preload(["json", "no_such_module_xyz"]).keys() == {"json"}
    assert runner._exit_code(SystemExit(None)) == 0 and runner._exit_code(SystemExit("x")) == 1


def test_deploy_scripts_are_valid_bash() -> None:
    import subprocess

    for script in sorted((REPO / "deploy").glob("*.sh")):
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_deploy_yaml_files_are_valid_experiments() -> None:
    from genseg_fed.config import load_config

    for name in ("demo.yaml", "experiment.yaml"):
        cfg = load_config(REPO / "deploy" / name)
        assert all(s.source == "folder" and s.path is None for s in cfg.data.sites)


def test_module_exports() -> None:
    assert set(launch.__all__) <= set(dir(launch))
