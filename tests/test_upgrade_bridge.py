"""The upgrade's bridge (launcher/bridge.py), held up by a stream in flight on the old program (it drains the
front door first): it answers /health, proxies /v1 to the servers with the front door's keys, answers the
rest with 503 and Retry-After in ErrorBody's shape, refuses a web page's Origin and a rebinding Host as the
daemon does, and a kill -9 of the daemon takes it along with the servers."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil

from launcher.api.origin import HostNames
from launcher.bridge import BridgeSpec
from launcher.config_daemon import DaemonSettings
from tests.conftest import ConfigWriter, Daemon, poll_until
from tests.test_front_door import first_event, held
from tests.test_upgrade import gone

StartDaemon = Callable[[Path], Daemon]
KEY = "bridge-key-1234"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def bridge_of(daemon: Daemon) -> psutil.Process:
    [bridge] = [c for c in psutil.Process(daemon.proc.pid).children() if "launcher.bridge" in c.cmdline()]
    return bridge


def test_the_bridge_answers_as_the_daemon_would_and_dies_with_it(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    config = write_config(
        {"m": {"binary": str(standin), "autostart": True, "aliases": ["also-m"], "drain_timeout_s": 60}},
        router={"api_keys": [KEY]},
    )
    daemon = start_daemon(config)
    server = daemon.wait_for("m", lambda s: s["state"] == "ready")["pid"]
    auth = {"Authorization": f"Bearer {KEY}"}
    with daemon.http.stream("POST", "/v1/chat/completions", json=held("m"), headers=auth, timeout=60) as stream:
        first_event(stream.iter_lines())
        daemon.proc.send_signal(signal.SIGUSR2)
        poll_until(lambda: "answers until the new program serves" in "".join(daemon.log), bool, "the bridge", 30)
        bridge = bridge_of(daemon)

        health = httpx.get(f"{daemon.url}/health", timeout=10)
        assert health.status_code == 200 and health.json()["instances"] == {"m": "ready"}
        models = httpx.get(f"{daemon.url}/v1/models", headers=auth, timeout=10).json()
        assert {m["id"] for m in models["data"]} == {"m", "also-m"}
        answer = httpx.post(f"{daemon.url}/v1/chat/completions", json={"model": "also-m", **CHAT}, headers=auth)
        assert answer.status_code == 200 and answer.json()["choices"], answer.text
        keyless = httpx.post(f"{daemon.url}/v1/chat/completions", json={"model": "m", **CHAT}, timeout=10)
        assert keyless.status_code == 401 and keyless.json()["error"]["code"] == "invalid_api_key"
        other = httpx.get(f"{daemon.url}/instances", timeout=10)
        assert other.status_code == 503 and other.headers["retry-after"] == "1"
        assert set(other.json()) == {"detail", "hint"}
        page = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}
        assert httpx.get(f"{daemon.url}/health", headers=page, timeout=10).status_code == 403
        rebinding = {"Host": "evil.example:8400"}
        assert httpx.get(f"{daemon.url}/v1/models", headers={**rebinding, **auth}, timeout=10).status_code == 421

        daemon.proc.kill()

        poll_until(lambda: gone(bridge.pid) and gone(server), bool, "the bridge's and the server's end", 10)


def test_a_bridge_whose_new_program_never_takes_over_ends_by_itself(marked_env: dict[str, str]) -> None:
    """A new program that hangs as it starts never tells the bridge to end: past its lifetime it stops
    answering for it (its /health of 200, from before the upgrade, would hide the hang)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        settings = DaemonSettings()
        bridge_spec = BridgeSpec(
            listen_fd=sock.fileno(), hosts=HostNames.of(settings), cors_origins=[], keys=None, routes={},
            health='{"status": "ok"}', health_status=200, drain_s=0.0, lifetime_s=1.0,
        )  # fmt: skip
        bridge = subprocess.Popen(
            [sys.executable, "-m", "launcher.bridge"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(sock.fileno(),),
            env=marked_env,
        )  # fmt: skip
        _, err = bridge.communicate(bridge_spec.model_dump_json().encode(), timeout=30)
    assert bridge.returncode == -signal.SIGTERM  # ended as the new program ends it (uvicorn raises it again)
    assert b"bridge: the new program did not take over within 1 s: ending" in err
