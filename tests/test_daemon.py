"""The daemon and the CLI end to end, as separate processes, with real llama-servers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from launcher.config_yaml import dump_config_yaml
from tests.conftest import ConfigWriter, Daemon, marked_processes, run_cli, stop_process, write_secret


def ready(status: dict[str, Any]) -> bool:
    return bool(status["state"] == "ready")


def test_up_complete_restart_down_through_the_daemon(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon], leaves_no_process: str
) -> None:
    daemon = start_daemon(write_config())
    assert daemon.http.get("/health").status_code == 200  # no autostart model: nothing to wait for

    up = daemon.cli("up", "tiny")
    assert up.returncode == 0, up.stderr
    assert "tiny is ready at http://127.0.0.1:" in up.stdout
    status = daemon.instance("tiny")
    assert ready(status)

    completion = httpx.post(
        f"http://127.0.0.1:{status['port']}/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, timeout=30
    )
    assert completion.status_code == 200
    assert completion.json()["choices"][0]["text"] is not None

    table = daemon.cli("status")
    assert table.returncode == 0
    assert table.stdout.splitlines()[0].split()[:4] == ["NAME", "STATE", "PID", "PORT"]
    assert f"tiny  ready  {status['pid']}" in table.stdout

    restarted = daemon.cli("restart", "tiny", "--json")
    assert restarted.returncode == 0, restarted.stderr
    after = json.loads(restarted.stdout)[0]
    assert after["state"] == "ready"
    assert after["pid"] != status["pid"]
    assert not psutil.pid_exists(status["pid"])

    down = daemon.cli("down", "tiny")
    assert down.returncode == 0, down.stderr
    assert daemon.instance("tiny")["state"] == "stopped"
    assert [p.pid for p in marked_processes(leaves_no_process)] == [daemon.proc.pid]


def test_status_json_is_stable(write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon]) -> None:
    daemon = start_daemon(write_config({"tiny": {"autostart": True}, "idle": {}}))
    daemon.wait_for("tiny", ready)
    result = daemon.cli("status", "--json")
    assert result.returncode == 0
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    for key in ("name", "model", "backend", "state", "pid", "port", "gpus", "restarts", "last_exit"):
        assert key in rows["tiny"]
        assert key in rows["idle"]
    assert rows["tiny"]["state"] == "ready"
    assert isinstance(rows["tiny"]["pid"], int)
    assert rows["idle"] | {"pid": None} == rows["idle"]
    assert rows["idle"]["state"] == "stopped"


def test_kill_9_restarts_at_once(write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon]) -> None:
    daemon = start_daemon(write_config({"tiny": {"autostart": True}}))
    before = daemon.wait_for("tiny", ready)
    os.kill(before["pid"], signal.SIGKILL)
    after = daemon.wait_for("tiny", lambda s: ready(s) and s["restarts"] == 1)
    assert after["pid"] != before["pid"]
    assert after["last_exit"] == "killed by SIGKILL"
    assert daemon.http.get("/health").status_code == 200


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_daemon_signal_stops_every_server(
    sig: signal.Signals,
    write_config: ConfigWriter,
    start_daemon: Callable[[Path], Daemon],
    leaves_no_process: str,
) -> None:
    daemon = start_daemon(write_config({"one": {"autostart": True}, "two": {"autostart": True}}))
    pids = [daemon.wait_for(name, ready)["pid"] for name in ("one", "two")]
    assert all(psutil.pid_exists(pid) for pid in pids)
    assert daemon.stop(sig) == 0
    assert not [p for p in pids if psutil.pid_exists(p)]
    assert marked_processes(leaves_no_process) == []


def test_api_errors_and_health(write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon]) -> None:
    daemon = start_daemon(write_config({"tiny": {"autostart": True}}))
    assert daemon.http.get("/instances/nope").status_code == 404
    assert daemon.http.post("/instances/nope/start").status_code == 404
    daemon.wait_for("tiny", ready)
    health = daemon.http.get("/health")
    assert health.status_code == 200
    assert health.json()["instances"] == {"tiny": "ready"}
    conflict = daemon.http.post("/instances/tiny/start")
    assert conflict.status_code == 409
    assert "already ready" in conflict.json()["detail"]
    stopped = daemon.http.post("/instances/tiny/stop")
    assert stopped.status_code == 202
    assert stopped.json()["state"] == "stopped"
    assert daemon.http.post("/instances/tiny/stop").status_code == 409
    degraded = daemon.http.get("/health")
    assert degraded.status_code == 503
    assert degraded.json()["instances"] == {"tiny": "stopped"}
    started = daemon.http.post("/instances/tiny/start")
    assert started.status_code == 202
    assert started.json()["state"] in ("starting", "loading", "ready")
    assert daemon.http.get("/instances/tiny/logs", params={"tail": 5}).text.count("\n") == 5


def test_token_guards_mutations(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon], tmp_path: Path
) -> None:
    write_secret(tmp_path / "token", "s3cret\n")
    daemon = start_daemon(write_config(daemon={"token_file": str(tmp_path / "token")}))
    assert daemon.http.get("/instances").status_code == 200  # reading needs no token
    refused = daemon.http.post("/instances/tiny/start")
    assert refused.status_code == 401
    wrong = daemon.http.post("/instances/tiny/start", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    up = daemon.cli("up", "tiny")  # the CLI reads the same token file
    assert up.returncode == 0, up.stderr
    assert daemon.cli("down", "tiny").returncode == 0


def test_non_loopback_without_token_is_refused(write_config: ConfigWriter, marked_env: dict[str, str]) -> None:
    config = write_config(daemon={"host": "0.0.0.0"})
    result = run_cli("--config", str(config), "serve", env=marked_env)
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0 without an API token" in result.stderr
    assert "Traceback" not in result.stderr


def test_second_daemon_on_the_same_port_says_so(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon], tmp_path: Path
) -> None:
    daemon = start_daemon(write_config())
    other = yaml.safe_load(daemon.config.read_text())
    other["daemon"]["state_dir"] = str(tmp_path / "other-state")  # its own state directory, the same port
    config = tmp_path / "other.yaml"
    config.write_text(dump_config_yaml(other))
    result = run_cli("--config", str(config), "serve", env=daemon.env)
    assert result.returncode == 1
    assert "cannot listen on 127.0.0.1:" in result.stderr
    assert "Traceback" not in result.stderr


def test_logs_command(write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon]) -> None:
    daemon = start_daemon(write_config({"tiny": {"autostart": True}}))
    daemon.wait_for("tiny", ready)
    result = daemon.cli("logs", "tiny", "-n", "200")
    assert result.returncode == 0
    assert "=== launcher" in result.stdout
    assert "starting tiny" in result.stdout


def test_logs_follow_across_a_restart(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon], marked_env: dict[str, str]
) -> None:
    daemon = start_daemon(write_config({"tiny": {"autostart": True}}))
    daemon.wait_for("tiny", ready)
    follower = subprocess.Popen(
        [sys.executable, "-m", "launcher", "--config", str(daemon.config), "logs", "tiny", "-f", "-n", "1"],
        env=marked_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline()  # the last line so far: the follower is connected
        daemon.http.post("/instances/tiny/restart")
        seen = []
        for line in follower.stdout:
            seen.append(line)
            if "server: listening on" in line:  # the new server's output, after the markers
                break
        text = "".join(seen)
        assert "tiny exited with code 0 (stopped on request)" in text
        assert "starting tiny" in text
    finally:
        stop_process(follower)
        assert follower.stdout is not None
        follower.stdout.close()
