"""Upgrading a running daemon in place (`launcher upgrade`, SIGUSR2), with real llama-servers: the servers keep
their process and their loaded model, the API refuses no connection during the swap, the new program still
takes its servers along when it is killed, and a hand-over that cannot be done ends in a normal start."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from launcher.config_model import ModelSettings
from launcher.supervise import adoption, handover
from tests.conftest import READY_TIMEOUT_S, ConfigWriter, Daemon, poll_until
from tests.test_drain import completed, serving, the_rest
from tests.test_front_door import event_messages, first_event, held

StartDaemon = Callable[[Path], Daemon]


def ready(status: dict[str, Any]) -> bool:
    return bool(status["state"] == "ready")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def program_started_at(daemon: Daemon) -> float | None:
    """What `/health` says of the daemon's running program (None while it does not answer)."""
    try:
        value = httpx.get(f"{daemon.url}/health", timeout=2).json()["program_started_at"]
    except httpx.HTTPError:
        return None
    return float(value)


def program_start(daemon: Daemon) -> float:
    """When the daemon's running program started (it answers now)."""
    started_at = program_started_at(daemon)
    assert started_at is not None
    return started_at


def upgraded(daemon: Daemon, before: float, timeout_s: float = 30) -> float:
    """Wait until the daemon answers with a program other than the one that started at ``before``."""
    after = poll_until(lambda: program_started_at(daemon), lambda v: v not in (None, before), "upgrade", timeout_s)
    assert after is not None
    return after


def loads_in_log(status: dict[str, Any]) -> int:
    """How many times the server's log says a model was loaded."""
    return Path(status["log_path"]).read_text().count("model loaded")


def complete(daemon: Daemon, model: str) -> dict[str, Any]:
    request = {"model": model, "prompt": "Hello", "max_tokens": 4, "cache_prompt": True}
    response = httpx.post(f"{daemon.url}/v1/completions", json=request, timeout=30)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_upgrade_keeps_every_server_and_its_loaded_model(write_config: ConfigWriter, start_daemon: StartDaemon) -> None:
    config = write_config({"tiny": {"autostart": True}, "asked": {}})
    daemon = start_daemon(config)
    assert daemon.cli("up", "asked").returncode == 0  # one started by hand, not autostart: kept too
    statuses = {name: daemon.wait_for(name, ready) for name in ("tiny", "asked")}
    loads = {name: loads_in_log(status) for name, status in statuses.items()}
    complete(daemon, "tiny")
    before = program_start(daemon)

    done = daemon.cli("upgrade")

    assert done.returncode == 0, done.stderr
    assert "servers kept: asked, tiny" in done.stdout, [e for e in event_messages(daemon) if "not taken over" in e]
    assert daemon.proc.poll() is None and upgraded(daemon, before) > before
    for name, status in statuses.items():
        now = daemon.instance(name)
        assert (now["state"], now["pid"], now["port"], now["plan"]) == (
            "ready",
            status["pid"],
            status["port"],
            status["plan"],
        )
        assert loads_in_log(now) == loads[name]  # the model was not loaded again
    # The server kept its prompt cache: the same prompt again is served from it.
    assert complete(daemon, "tiny")["usage"]["prompt_tokens"] > 0
    timings = httpx.post(
        f"http://127.0.0.1:{statuses['tiny']['port']}/completion",
        json={"prompt": "Hello", "n_predict": 1, "cache_prompt": True},
        timeout=30,
    ).json()["timings"]
    assert timings["cache_n"] > 0


def _hammer(url: str, stop: threading.Event, gaps_s: dict[str, list[float]], failures: list[str]) -> None:
    """GET /health and /v1/models on a new connection each (as a fresh client would) until ``stop``;
    each wait for an answer goes into ``gaps_s`` by path, every error into ``failures``."""
    while not stop.is_set():
        for path in ("/health", "/v1/models"):
            began = time.monotonic()
            try:
                response = httpx.get(url + path, timeout=10)
                if response.status_code != 200:
                    failures.append(f"{path}: {response.status_code}")
            except httpx.HTTPError as exc:
                failures.append(f"{path}: {type(exc).__name__}: {exc}")
            gaps_s.setdefault(path, []).append(time.monotonic() - began)


def test_no_connection_is_refused_during_an_upgrade(write_config: ConfigWriter, start_daemon: StartDaemon) -> None:
    """Nor left unanswered for long: the bridge (launcher/bridge.py) answers /health and proxies /v1 while
    the old program drains and the new one starts."""
    daemon = start_daemon(write_config({"tiny": {"autostart": True}}))
    pid = daemon.wait_for("tiny", ready)["pid"]
    before = program_start(daemon)
    stop, gaps_s, failures = threading.Event(), dict[str, list[float]](), list[str]()
    hammer = threading.Thread(target=_hammer, args=(daemon.url, stop, gaps_s, failures))
    hammer.start()

    def answered() -> int:
        return len(gaps_s.get("/v1/models", []))

    try:
        poll_until(answered, lambda n: n > 10, "requests before the upgrade", 10)
        daemon.proc.send_signal(signal.SIGUSR2)
        upgraded(daemon, before, timeout_s=90)  # the hammer, answered now, slows the new program's start
        after = answered()
        poll_until(answered, lambda n: n > after + 10, "requests after the upgrade", 10)
    finally:
        stop.set()
        hammer.join(timeout=30)
    assert failures == []
    assert daemon.instance("tiny")["pid"] == pid
    assert "the bridge did not start" not in "".join(daemon.log)
    for path, waits_s in gaps_s.items():
        print(f"{path}: longest wait for an answer across the upgrade: {max(waits_s) * 1000:.0f} ms")


def test_kill_9_of_the_new_program_leaves_no_server(write_config: ConfigWriter, start_daemon: StartDaemon) -> None:
    daemon = start_daemon(write_config({"tiny": {"autostart": True}}))
    pid = daemon.wait_for("tiny", ready)["pid"]
    before = program_start(daemon)
    daemon.proc.send_signal(signal.SIGUSR2)
    upgraded(daemon, before)
    assert daemon.instance("tiny")["pid"] == pid  # taken over, and the new program is its parent
    assert psutil.Process(pid).ppid() == daemon.proc.pid

    daemon.proc.kill()

    poll_until(lambda: gone(pid), bool, "the server's end", 10)


def _same_daemon(config: Path) -> dict[str, Any]:
    section: dict[str, Any] = yaml.safe_load(config.read_text())["daemon"]
    return section


def test_a_server_the_configuration_now_runs_otherwise_is_started_again(
    write_config: ConfigWriter, start_daemon: StartDaemon
) -> None:
    config = write_config({"tiny": {"autostart": True}})
    daemon = start_daemon(config)
    pid = daemon.wait_for("tiny", ready)["pid"]
    before = program_start(daemon)
    write_config({"tiny": {"autostart": True, "ctx": 512}}, daemon=_same_daemon(config))

    daemon.proc.send_signal(signal.SIGUSR2)

    upgraded(daemon, before)
    status = daemon.wait_for("tiny", lambda s: ready(s) and s["pid"] != pid)
    assert "512" in psutil.Process(status["pid"]).cmdline()
    assert gone(pid)
    events = httpx.get(f"{daemon.url}/events", params={"recent": 100, "follow": "false"}, timeout=10).text
    assert "was not taken over: its model's settings changed since it started" in events


def test_a_new_program_that_would_build_another_command_from_the_same_settings_takes_the_server_over(
    write_config: ConfigWriter, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """What a new version adds to the command it builds (here: another prompt cache folder, a daemon key)
    must not restart the models: the server keeps the command it runs until its next start."""
    config = write_config({"tiny": {"autostart": True}})
    daemon = start_daemon(config)
    pid = daemon.wait_for("tiny", ready)["pid"]
    before = program_start(daemon)
    running = psutil.Process(pid).cmdline()
    write_config({"tiny": {"autostart": True}}, daemon={**_same_daemon(config), "kv_cache_dir": str(tmp_path / "kv")})

    daemon.proc.send_signal(signal.SIGUSR2)

    upgraded(daemon, before)
    assert daemon.instance("tiny")["pid"] == pid
    plan = daemon.http.get("/plan/tiny").json()
    assert plan["command"][1:] == running[len(running) - len(plan["command"]) + 1 :]  # the command it runs


def test_settings_compare_by_the_keys_the_old_program_knew() -> None:
    settings = ModelSettings.model_validate({"model": "/m.gguf", "ctx": 512})
    recorded = json.loads(settings.model_dump_json())
    assert adoption.same_settings(json.dumps(recorded), settings)
    del recorded["priority"]  # a key new in this version: the old program ran it as its default
    assert adoption.same_settings(json.dumps(recorded), settings)
    assert not adoption.same_settings(json.dumps({**recorded, "ctx": 1024}), settings)
    assert not adoption.same_settings(json.dumps({**recorded, "gone_key": 1}), settings)  # a key dropped since
    assert not adoption.same_settings("not json", settings)
    assert not adoption.same_settings("[1]", settings)


def test_a_server_that_does_not_answer_is_killed_and_started_again(
    write_config: ConfigWriter, start_daemon: StartDaemon
) -> None:
    daemon = start_daemon(write_config({"tiny": {"autostart": True, "health": {"timeout": 0.5}}}))
    pid = daemon.wait_for("tiny", ready)["pid"]
    before = program_start(daemon)
    os.kill(pid, signal.SIGSTOP)  # alive, but it answers nothing
    try:
        daemon.proc.send_signal(signal.SIGUSR2)
        upgraded(daemon, before)
        status = daemon.wait_for("tiny", lambda s: ready(s) and s["pid"] != pid)
    finally:
        if not gone(pid):
            os.kill(pid, signal.SIGCONT)
    assert gone(pid) and status["restarts"] == 0


def test_a_hand_over_that_cannot_be_written_keeps_the_daemon_serving(
    write_config: ConfigWriter, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    daemon = start_daemon(write_config({"tiny": {"autostart": True}}))
    pid = daemon.wait_for("tiny", ready)["pid"]
    before = program_start(daemon)
    (tmp_path / "state" / "handover.json").mkdir()  # the record cannot replace a directory

    daemon.proc.send_signal(signal.SIGUSR2)

    # Not any "upgrade: " line: the bridge's comes first, and it answers `/instances` with 503 until the exec.
    failed = "serving on with the running program"
    poll_until(lambda: failed in "".join(daemon.log), bool, "the upgrade's failure", READY_TIMEOUT_S)
    assert program_started_at(daemon) == before  # the same program serves on
    assert daemon.wait_for("tiny", ready)["pid"] == pid
    assert daemon.stop() == 0


@pytest.mark.parametrize("record", ["{not json", '{"daemon_pid": 1, "servers": []}'])
def test_a_record_that_does_not_check_out_ends_in_a_normal_start(
    write_config: ConfigWriter, start_daemon: StartDaemon, tmp_path: Path, record: str
) -> None:
    """A record left behind (corrupt, or of another process) is ignored: nothing is adopted from it."""
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "handover.json").write_text(record)
    daemon = start_daemon(write_config({"tiny": {"autostart": True}}))
    assert daemon.wait_for("tiny", ready)["restarts"] == 0
    assert not (tmp_path / "state" / "handover.json").exists()


def test_a_stream_in_flight_finishes_on_the_old_program_then_the_upgrade_goes_on(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    daemon = serving(write_config, start_daemon, standin)
    pid, port = (daemon.instance("m")[key] for key in ("pid", "port"))
    before = program_start(daemon)
    with daemon.http.stream("POST", "/v1/chat/completions", json=held("m")) as stream:
        lines = stream.iter_lines()
        first_event(lines)
        daemon.proc.send_signal(signal.SIGUSR2)
        poll_until(lambda: "answers until the new program" in "".join(daemon.log), bool, "the upgrade's bridge", 30)
        # The old program accepts nothing new (the bridge answers), and is not replaced while the stream is
        # in flight.
        assert program_started_at(daemon) == before
        assert "upgrade: executing" not in "".join(daemon.log)
        # Let the stand-in finish (asked of the server itself).
        assert httpx.post(f"http://127.0.0.1:{port}/release", json={}, timeout=10).status_code == 200
        assert completed(the_rest(lines))
    upgraded(daemon, before)
    assert daemon.instance("m")["pid"] == pid


def test_the_inherited_socket_is_taken_only_where_the_daemon_listens(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listening:
        port = listening.getsockname()[1]
        for asked_port, taken in ((port, True), (port + 1, False)):
            fd = os.dup(listening.fileno())
            os.set_inheritable(fd, True)
            monkeypatch.setenv(handover.LISTEN_FD_ENV, f"{os.getpid()}:{fd}")
            sock = handover.inherited_socket("127.0.0.1", asked_port)
            assert handover.LISTEN_FD_ENV not in os.environ  # never passed on to a server
            if taken:
                assert sock is not None and sock.fileno() == fd and not sock.get_inheritable()
                sock.close()
            else:
                assert sock is None
                with pytest.raises(OSError, match="Bad file descriptor"):
                    os.fstat(fd)  # closed


@pytest.mark.parametrize("bound_to_parent", [False, True])
def test_a_listening_fd_named_by_another_process_is_left_alone(
    monkeypatch: pytest.MonkeyPatch, bound_to_parent: bool
) -> None:
    """$LAUNCHER_LISTEN_FD inherited by a normal start (the journal's stream on fd 2, say) is not closed."""
    first, second = socket.socketpair()
    with first, second:
        value = f"{os.getppid()}:{first.fileno()}" if bound_to_parent else str(first.fileno())
        monkeypatch.setenv(handover.LISTEN_FD_ENV, value)
        assert handover.inherited_socket("127.0.0.1", 8000) is None
        first.sendall(b"x")  # still open
        assert second.recv(1) == b"x"
