"""The CLI without a daemon: foreground supervision and its errors (one sentence, right exit code)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.conftest import ConfigWriter, Daemon, free_port, marked_processes, run_cli, stop_process


def assert_clean_error(result: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert text in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("launcher: ")


def test_bad_config_exits_2_naming_file_and_key(tmp_path: Path, marked_env: dict[str, str]) -> None:
    config = tmp_path / "launcher.yaml"
    config.write_text("models:\n  demo:\n    model: x.gguf\n    port: 70000\n    colour: blue\n")
    result = run_cli("--config", str(config), "up", "demo", env=marked_env)
    assert_clean_error(result, 2, f"{config}: models.demo.port: should be 'auto' or less than or equal to 65535")
    assert f"{config}: models.demo.colour: unknown key" in result.stderr


def test_invalid_yaml_exits_2(tmp_path: Path, marked_env: dict[str, str]) -> None:
    config = tmp_path / "launcher.yaml"
    config.write_text("models: [unclosed\n")
    assert_clean_error(run_cli("--config", str(config), "status", env=marked_env), 2, f"{config} at line 2")


def test_missing_config_file_exits_2(tmp_path: Path, marked_env: dict[str, str]) -> None:
    result = run_cli("--config", str(tmp_path / "nope.yaml"), "up", "demo", env=marked_env)
    assert_clean_error(result, 2, "nope.yaml does not exist")


def test_unknown_model_exits_2(write_config: ConfigWriter, marked_env: dict[str, str]) -> None:
    result = run_cli("--config", str(write_config()), "up", "nope", env=marked_env)
    assert_clean_error(result, 2, "no model named 'nope'")
    assert "configured models: tiny" in result.stderr


def test_missing_model_file_exits_2(write_config: ConfigWriter, tmp_path: Path, marked_env: dict[str, str]) -> None:
    config = write_config({"tiny": {"model": str(tmp_path / "gone.gguf")}})
    assert_clean_error(run_cli("--config", str(config), "up", "tiny", env=marked_env), 2, "gone.gguf")


def test_missing_binary_exits_2(write_config: ConfigWriter, tmp_path: Path, marked_env: dict[str, str]) -> None:
    config = write_config({"tiny": {"binary": str(tmp_path / "no-llama-server")}})
    result = run_cli("--config", str(config), "up", "tiny", env=marked_env)
    assert_clean_error(result, 2, "no-llama-server does not exist or is not executable")


def test_port_taken_exits_1(write_config: ConfigWriter, marked_env: dict[str, str]) -> None:
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        result = run_cli("--config", str(write_config({"tiny": {"port": port}})), "up", "tiny", env=marked_env)
    assert_clean_error(result, 1, f"port {port} is already in use by")


def test_down_without_daemon_exits_1(write_config: ConfigWriter, marked_env: dict[str, str]) -> None:
    result = run_cli("--config", str(write_config()), "down", "tiny", env=marked_env)
    assert_clean_error(result, 1, "no launcher daemon answers at http://127.0.0.1:")


def test_bad_usage_exits_2(marked_env: dict[str, str]) -> None:
    result = run_cli("up", env=marked_env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])  # SIGHUP: the terminal went away
def test_foreground_up_supervises_until_signalled(
    sig: signal.Signals, write_config: ConfigWriter, marked_env: dict[str, str], leaves_no_process: str
) -> None:
    config = write_config({"tiny": {}, "other": {}})
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "--config", str(config), "up", "tiny", "other"],
        env=marked_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    assert proc.stdout is not None
    for line in proc.stderr:  # progress, then the line that says it is supervising
        if "supervising in the foreground" in line:
            break
    out = proc.stdout.readline() + proc.stdout.readline()
    assert "tiny is ready at http://127.0.0.1:" in out
    assert "other is ready" in out
    servers = [p for p in marked_processes(leaves_no_process) if p.pid != proc.pid]
    assert len(servers) == 2
    assert all("llama-server" in p.name() for p in servers)
    status = run_cli("--config", str(config), "status", "--json", env=marked_env)  # the API answers meanwhile
    assert sorted((row["name"], row["state"]) for row in json.loads(status.stdout)) == [
        ("other", "ready"),
        ("tiny", "ready"),
    ]
    assert stop_process(proc, sig) == 0
    proc.stdout.close()
    proc.stderr.close()
    assert not [p for p in servers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_detach_starts_a_background_daemon(
    write_config: ConfigWriter, marked_env: dict[str, str], leaves_no_process: str
) -> None:
    config = write_config()
    result = run_cli("--config", str(config), "up", "tiny", "--detach", env=marked_env)
    try:
        assert result.returncode == 0, result.stderr
        assert "started a background daemon" in result.stderr
        assert "tiny is ready at" in result.stdout
        status = run_cli("--config", str(config), "status", "--json", env=marked_env)
        assert '"state": "ready"' in status.stdout
    finally:
        daemons = [p for p in marked_processes(leaves_no_process) if "serve" in p.cmdline()]
        for d in daemons:
            d.terminate()
        psutil.wait_procs(daemons, timeout=30)


def test_commands_that_ask_the_daemon_load_no_planner_and_no_web_framework(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon]
) -> None:
    daemon = start_daemon(write_config())
    command = [sys.executable, "-X", "importtime", "-m", "launcher", "--config", str(daemon.config), "status"]
    result = subprocess.run(command, env=daemon.env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    loaded = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    heavy = {"numpy", "gguf", "httpx", "fastapi", "uvicorn", "pydantic_settings", "launcher.plan.model_plan", "asyncio"}
    heavy |= {"huggingface_hub", "launcher.hub.headers"}
    assert loaded & heavy == set()
    assert {"launcher.schema", "launcher.client"} <= loaded  # it did import what it needs: the check can fail
