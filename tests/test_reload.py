"""Reloading the configuration of a running daemon (`launcher reload`, SIGHUP, `POST /config/reload`), with
real llama-servers: kept models keep their process, changed ones restart with their new settings, removed
ones stop and leave the API, added ones appear; a file that does not load changes nothing."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from tests.conftest import READY_TIMEOUT_S, ConfigWriter, Daemon, poll_until

StartDaemon = Callable[[Path], Daemon]


def ready(status: dict[str, Any]) -> bool:
    return bool(status["state"] == "ready")


def same_daemon(config: Path) -> dict[str, Any]:
    """The `daemon:` section of ``config``: an edit keeps it (write_config picks a new port otherwise)."""
    daemon: dict[str, Any] = yaml.safe_load(config.read_text())["daemon"]
    return daemon


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def reload_events(daemon: Daemon) -> list[str]:
    with daemon.http.stream("GET", "/events", params={"recent": 500, "follow": "false"}) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    return [line for line in lines if "reload" in line]


@pytest.mark.parametrize("how", ["cli", "sighup"])
def test_keep_change_remove_add_in_one_edit(write_config: ConfigWriter, start_daemon: StartDaemon, how: str) -> None:
    config = write_config({"kept": {"autostart": True}, "changed": {"autostart": True}, "removed": {"autostart": True}})
    daemon = start_daemon(config)
    before = {name: daemon.wait_for(name, ready) for name in ("kept", "changed", "removed")}

    write_config(
        {"kept": {"autostart": True}, "changed": {"autostart": True, "ctx": 512}, "added": {"autostart": True}},
        daemon=same_daemon(config),
    )
    if how == "cli":
        done = daemon.cli("reload")
        assert done.returncode == 0, done.stderr
        rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()[1:]}
        assert rows == {
            "kept": ["kept", "-"],
            "changed": ["restarted", "ctx"],
            "added": ["added", "-"],
            "removed": ["stopped", "-"],
        }
    else:
        daemon.proc.send_signal(signal.SIGHUP)

    daemon.wait_for("changed", lambda s: ready(s) and s["pid"] != before["changed"]["pid"])
    command = daemon.http.get("/plan/changed").json()["command"]  # what its server was started with
    assert command[command.index("--ctx-size") + 1] == "512"  # its new argument
    assert daemon.wait_for("added", ready)["pid"] is not None
    poll_until(lambda: daemon.http.get("/instances/removed").status_code, lambda code: code == 404, "removed", 30)
    assert gone(before["removed"]["pid"])
    kept = daemon.instance("kept")
    assert (kept["pid"], kept["restarts"], kept["state"]) == (before["kept"]["pid"], 0, "ready")
    assert sorted(s["name"] for s in daemon.http.get("/instances").json()) == ["added", "changed", "kept"]
    assert any("restarted changed (ctx)" in event for event in reload_events(daemon))


def test_live_keys_apply_without_a_restart(write_config: ConfigWriter, start_daemon: StartDaemon) -> None:
    config = write_config({"tiny": {"autostart": True}})
    daemon = start_daemon(config)
    pid = daemon.wait_for("tiny", ready)["pid"]

    write_config(
        {"tiny": {"autostart": True, "aliases": ["small"], "idle_ttl_s": 600}},
        daemon=same_daemon(config),
        router={"api_keys": ["sesame"]},
    )
    done = daemon.http.post("/config/reload")
    assert done.status_code == 200, done.text
    assert done.json()["instances"] == [
        {"name": "tiny", "model": "tiny", "change": "live-updated", "keys": ["aliases", "idle_ttl_s"], "reason": None}
    ]
    assert done.json()["applied"] == ["router.api_keys"]
    request = {"model": "small", "prompt": "Hi", "max_tokens": 2}
    assert daemon.http.post("/v1/completions", json=request).status_code == 401  # the new key is asked for
    served = daemon.http.post("/v1/completions", json=request, headers={"Authorization": "Bearer sesame"})
    assert served.status_code == 200, served.text  # and the front door answers to the new alias
    status = daemon.instance("tiny")
    assert (status["pid"], status["restarts"]) == (pid, 0)


@pytest.mark.parametrize(
    ("broken", "says"),
    [
        ("models: {tiny: {model: MODEL, colour: red}}", "models.tiny.colour: unknown key"),
        ("models: [unclosed", "launcher.yaml"),
        ("models: {tiny: {model: /nowhere/x.gguf, ctx: 512}}", "model file /nowhere/x.gguf for 'tiny' does not exist"),
    ],
    ids=["unknown-key", "bad-yaml", "missing-model-file"],
)
def test_a_broken_file_changes_nothing_and_says_why(
    write_config: ConfigWriter, start_daemon: StartDaemon, tiny_model: Path, broken: str, says: str
) -> None:
    config = write_config({"tiny": {"autostart": True}})
    daemon = start_daemon(config)
    pid = daemon.wait_for("tiny", ready)["pid"]
    good = config.read_text()
    daemon_section = yaml.safe_dump({"daemon": same_daemon(config), "gpus": {"backend": "none"}})
    config.write_text(daemon_section + broken.replace("MODEL", str(tiny_model)) + "\n")

    done = daemon.cli("reload")
    assert done.returncode == 1
    error = done.stderr.removeprefix("launcher: ").splitlines()[0]
    assert says in error
    answer = daemon.http.post("/config/reload")
    assert answer.status_code == 422
    assert answer.json()["detail"] == error  # the API's ErrorBody says the same sentence
    if "model file" not in says:  # `serve` itself refuses the file with the same sentence
        serve = daemon.cli("serve")
        assert serve.returncode != 0
        assert error in serve.stderr
    status = daemon.instance("tiny")
    assert (status["pid"], status["state"]) == (pid, "ready")
    assert any("was not reloaded" in event and says.split(":")[0] in event for event in reload_events(daemon))
    config.write_text(good)
    assert daemon.cli("reload").returncode == 0  # the daemon still reloads a good file


def test_dry_run_changes_nothing(write_config: ConfigWriter, start_daemon: StartDaemon) -> None:
    config = write_config({"tiny": {"autostart": True}})
    daemon = start_daemon(config)
    pid = daemon.wait_for("tiny", ready)["pid"]
    write_config({"tiny": {"autostart": True, "ctx": 512}, "more": {}}, daemon=same_daemon(config))

    shown = daemon.cli("reload", "--dry-run")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[0].split() == ["INSTANCE", "WOULD", "BE", "KEYS"]
    assert "dry run: nothing changed" in shown.stdout
    answer = httpx.post(f"{daemon.url}/config/reload", params={"dry_run": "true"}, timeout=READY_TIMEOUT_S)
    assert sorted((i["name"], i["change"]) for i in answer.json()["instances"]) == [
        ("more", "added"),
        ("tiny", "restarted"),
    ]
    assert [s["name"] for s in daemon.http.get("/instances").json()] == ["tiny"]
    status = daemon.instance("tiny")
    assert (status["pid"], status["restarts"]) == (pid, 0)


def test_gpu_keys_apply_live_and_the_listening_port_waits(
    write_config: ConfigWriter, start_daemon: StartDaemon
) -> None:
    sim = {"backend": "sim", "sim": [{"name": "Sim", "memory_mib": 24576, "temperature_c": 85}]}
    config = write_config({"tiny": {"autostart": True}}, gpus=sim)
    daemon = start_daemon(config)
    pid = daemon.wait_for("tiny", ready)["pid"]

    moved = {**same_daemon(config), "port": same_daemon(config)["port"] + 1}
    write_config({"tiny": {"autostart": True}}, gpus={**sim, "thermal_limit_c": 80}, daemon=moved)
    elsewhere = daemon.cli("reload")  # the CLI looks where the file says: it is told where the daemon listens
    assert elsewhere.returncode == 1 and f"it listens at {daemon.url}" in elsewhere.stderr
    done = daemon.cli("--url", daemon.url, "reload", "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert (answer["applied"], answer["waiting"]) == (["gpus.thermal_limit_c"], ["daemon.port"])
    poll_until(lambda: thermal_events(daemon), bool, "a thermal event under the new limit", 10)
    assert daemon.http.get("/gpus/topology").json()["thermal_limit_c"] == 80  # the dashboard draws the new limit
    assert daemon.instance("tiny")["pid"] == pid


def thermal_events(daemon: Daemon) -> list[str]:
    with daemon.http.stream("GET", "/events", params={"recent": 500, "follow": "false"}) as response:
        return [line for line in response.iter_lines() if line.startswith("event: thermal")]


def test_the_watcher_applies_a_saved_file_once(write_config: ConfigWriter, start_daemon: StartDaemon) -> None:
    config = write_config({"tiny": {"autostart": True}}, daemon={"watch_config": True})
    daemon = start_daemon(config)
    pid = daemon.wait_for("tiny", ready)["pid"]
    whole = config.read_text()
    write_config({"tiny": {"autostart": True}, "more": {}}, daemon=same_daemon(config))
    edited = config.read_text()

    config.write_text(edited[: len(edited) // 2])  # written in two pieces: the watcher reads it whole
    time.sleep(0.2)  # a pause within the watcher's quiet time (0.5 s), as a slow writer makes
    config.write_text(edited)
    poll_until(lambda: daemon.http.get("/instances/more").status_code, lambda code: code == 200, "more", 10)
    config.write_text(edited)  # saved again unchanged, and another file of the folder: nothing to reload
    (config.parent / "notes.txt").write_text("hello")
    # An absence has no event to await: give the watcher its quiet time and then some, so
    # these writes are a batch of their own, before the real change (quiet time 0.5 s).
    time.sleep(2.0)
    config.write_text(whole)  # then a real change: the last reload
    poll_until(lambda: daemon.http.get("/instances/more").status_code, lambda code: code == 404, "more gone", 10)

    events = reload_events(daemon)
    assert [e for e in events if "reloaded:" in e and "added more" in e], events
    assert len([e for e in events if "reloaded:" in e]) == 2, events  # one per change, none for the rest
    assert not [e for e in events if "not reloaded" in e], events  # the half-written file was never read
    assert daemon.instance("tiny")["pid"] == pid


def test_requests_queued_for_a_removed_model_hear_it_at_once(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    """A request waiting for a model that is still loading, when a reload removes that model, is answered
    404 then, not at its queue's timeout with a 429 that says to retry."""
    loading = {"binary": str(standin), "autostart": True, "env": {"STANDIN_LOAD_S": "120"}}
    config = write_config({"kept": {"autostart": True}, "loading": loading})
    daemon = start_daemon(config)
    daemon.wait_for("loading", lambda s: s["state"] == "loading")
    with ThreadPoolExecutor(1) as pool:
        request = {"model": "loading", "prompt": "Hi", "max_tokens": 2}
        waiting = pool.submit(daemon.http.post, "/v1/completions", json=request, timeout=60)
        poll_until(lambda: daemon.instance("loading")["requests_queued"], lambda n: n == 1, "queued", 30)
        write_config({"kept": {"autostart": True}}, daemon=same_daemon(config))
        assert daemon.http.post("/config/reload").status_code == 200
        answer = waiting.result(timeout=30)
    assert answer.status_code == 404, answer.text
    assert "loading was removed from the configuration" in answer.json()["error"]["message"]


def test_requests_sent_throughout_a_reloads_restart_all_succeed(
    write_config: ConfigWriter, start_daemon: StartDaemon
) -> None:
    """A reload restarts a changed model as one restart: requests sent all along are served by the old
    server (drained) or wait in the queue for the new one; none is refused in between."""
    config = write_config({"tiny": {"autostart": True}})
    daemon = start_daemon(config)
    pid = daemon.wait_for("tiny", ready)["pid"]
    stop = threading.Event()
    codes: list[int] = []

    def send() -> None:
        with httpx.Client(base_url=daemon.url, timeout=60) as http:
            while not stop.is_set():
                request = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}
                codes.append(http.post("/v1/completions", json=request).status_code)

    with ThreadPoolExecutor(2) as pool:
        senders = [pool.submit(send) for _ in range(2)]
        poll_until(lambda: len(codes), lambda n: n >= 4, "requests before the reload", 30)
        write_config({"tiny": {"autostart": True, "ctx": 512}}, daemon=same_daemon(config))
        assert daemon.http.post("/config/reload").status_code == 200
        daemon.wait_for("tiny", lambda s: ready(s) and s["pid"] != pid)
        served_before = len(codes)
        poll_until(lambda: len(codes), lambda n: n >= served_before + 4, "requests after the reload", 30)
        stop.set()
        for sender in senders:
            sender.result(timeout=60)
    assert codes and set(codes) == {200}, sorted(set(codes))
