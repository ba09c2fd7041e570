"""Rolling restarts with a real daemon and real llama-servers: a model's two replicas restart one at a time
(by `launcher restart NAME` and by a reload that changes the model) while requests flow through the front
door without one failing, and a replica that does not come back stops the roll with the other still
serving from its old server."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ConfigWriter, Daemon, poll_until
from tests.test_ollama import sim_gpus
from tests.test_reload import same_daemon

StartDaemon = Callable[[Path], Daemon]
REPLICAS = ("tiny@0", "tiny@1")
SENDERS = 3


def two_replicas(**over: Any) -> dict[str, dict[str, Any]]:
    return {"tiny": {"replicas": 2, "autostart": True, **over}}


def ready_pids(daemon: Daemon) -> dict[str, int]:
    return {name: daemon.wait_for(name, lambda s: s["state"] == "ready")["pid"] for name in REPLICAS}


@contextmanager
def steady_load(daemon: Daemon) -> Iterator[tuple[list[int], list[int]]]:
    """Requests for `tiny` sent without pause from a few threads through the front door, their status codes
    collected; and, sampled as often, how many replicas are ready (never zero in a roll)."""
    stop = threading.Event()
    codes: list[int] = []
    serving: list[int] = []

    def send() -> None:
        with httpx.Client(base_url=daemon.url, timeout=60) as http:
            while not stop.is_set():
                request = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}
                codes.append(http.post("/v1/completions", json=request).status_code)

    def watch() -> None:
        with httpx.Client(base_url=daemon.url, timeout=60) as http:
            while not stop.is_set():
                states = [s["state"] for s in http.get("/instances").json() if s["group"] == "tiny"]
                serving.append(states.count("ready"))

    with ThreadPoolExecutor(SENDERS + 1) as pool:
        workers = [pool.submit(send) for _ in range(SENDERS)] + [pool.submit(watch)]
        poll_until(lambda: len(codes), lambda n: n >= 6, "requests before the roll", 30)
        try:
            yield codes, serving
            sent = len(codes)
            poll_until(lambda: len(codes), lambda n: n >= sent + 6, "requests after the roll", 30)
        finally:
            stop.set()
            for worker in workers:
                worker.result(timeout=60)


def roll_events(daemon: Daemon) -> list[str]:
    with daemon.http.stream("GET", "/events", params={"recent": 500, "follow": "false"}) as response:
        return [line for line in response.iter_lines() if line.startswith("data: ") and '"kind":"roll"' in line]


@pytest.mark.parametrize("how", ["restart", "reload"])
def test_two_replicas_roll_one_at_a_time_and_no_request_fails(
    write_config: ConfigWriter, start_daemon: StartDaemon, how: str
) -> None:
    config = write_config(two_replicas(), gpus=sim_gpus(2))
    daemon = start_daemon(config)
    before = ready_pids(daemon)

    with steady_load(daemon) as (codes, serving):
        sent_before = len(codes)
        if how == "restart":
            done = daemon.cli("restart", "tiny")
            assert done.returncode == 0, done.stderr
            assert done.stdout.startswith("rolled tiny: tiny@0, tiny@1 restarted one at a time in "), done.stdout
        else:
            write_config(two_replicas(ctx=512), gpus=sim_gpus(2), daemon=same_daemon(config))
            assert daemon.http.post("/config/reload").status_code == 200  # it answers once the roll is over
        served_during = len(codes) - sent_before
        after = {name: daemon.instance(name) for name in REPLICAS}

    assert all(s["state"] == "ready" and s["pid"] != before[s["name"]] for s in after.values()), after
    assert codes and set(codes) == {200}, sorted(set(codes))
    assert served_during > 0  # requests flowed while the replicas rolled
    assert serving and min(serving) >= 1, serving  # never zero replicas serving
    events = roll_events(daemon)
    assert len(events) == 4, events  # began, each replica, rolled
    assert "tiny@0 restarted and ready" in events[1] and "tiny@1 restarted and ready" in events[2]
    assert "rolled tiny" in events[3]
    if how == "reload":
        for name in REPLICAS:  # each with its new argument
            command = daemon.http.get(f"/plan/{name}").json()["command"]
            assert command[command.index("--ctx-size") + 1] == "512"


def test_a_replica_that_does_not_come_back_stops_the_roll_and_the_other_keeps_serving(
    write_config: ConfigWriter, start_daemon: StartDaemon
) -> None:
    config = write_config(two_replicas(), gpus=sim_gpus(2))
    daemon = start_daemon(config)
    before = ready_pids(daemon)

    with steady_load(daemon) as (codes, serving):
        # an option the server knows, with a value it rejects: each new server exits before it is ready
        write_config(two_replicas(args=["--threads", "many"]), gpus=sim_gpus(2), daemon=same_daemon(config))
        answer = daemon.http.post("/config/reload")
        assert answer.status_code == 200
        # the reload's answer says so per replica: the one that stopped the roll, the one it did not reach
        outcomes = {i["name"]: (i["change"], i["reason"]) for i in answer.json()["instances"]}
        assert outcomes["tiny@0"][0] == "failed" and "its new server did not come back" in outcomes["tiny@0"][1]
        assert outcomes["tiny@1"] == ("failed", "not restarted: the rolling restart stopped at tiny@0")
        events = roll_events(daemon)
        assert "rolling restart of tiny stopped at tiny@0: its new server did not come back" in events[-1], events
        assert "kept their old server: tiny@1" in events[-1]
        # the model's restart rolls again and stops at the same replica, saying so and exiting 1
        done = daemon.cli("restart", "tiny")
        assert done.returncode == 1 and done.stdout.startswith("rolling restart of tiny stopped at tiny@0: ")

    kept = daemon.instance("tiny@1")
    assert (kept["state"], kept["pid"]) == ("ready", before["tiny@1"])
    # its policy tries once more and, told the same again, gives up
    assert "stoi" in daemon.wait_for("tiny@0", lambda s: s["state"] == "failed")["last_error"]
    assert codes and set(codes) == {200}, sorted(set(codes))
    assert serving and min(serving) >= 1, serving


def test_after_a_stopped_roll_a_restart_rolls_every_replica_onto_the_configured_settings(
    write_config: ConfigWriter, start_daemon: StartDaemon, tiny_model: Path, tmp_path: Path
) -> None:
    """A reload's roll that stopped left the replicas after the stop with their old settings; once what
    failed is mended, `launcher restart NAME` brings each one onto the settings configured now."""
    config = write_config(two_replicas(), gpus=sim_gpus(2))
    daemon = start_daemon(config)
    before = ready_pids(daemon)
    moved = tmp_path / "moved.gguf"
    moved.write_bytes(tiny_model.read_bytes()[: tiny_model.stat().st_size // 2])  # there, but cut short

    write_config(two_replicas(model=str(moved)), gpus=sim_gpus(2), daemon=same_daemon(config))
    assert daemon.http.post("/config/reload").status_code == 200
    assert "stopped at tiny@0" in roll_events(daemon)[-1]
    kept = daemon.instance("tiny@1")
    assert (kept["state"], kept["pid"]) == ("ready", before["tiny@1"])
    assert daemon.http.get("/plan/tiny@1").json()["command"][2] == str(tiny_model)  # its old settings

    moved.write_bytes(tiny_model.read_bytes())  # mended
    done = daemon.cli("restart", "tiny")
    assert done.returncode == 0 and done.stdout.startswith("rolled tiny: tiny@0, tiny@1 "), done.stdout
    for name in REPLICAS:
        status = daemon.instance(name)
        assert status["state"] == "ready" and status["pid"] != before[name]
        assert daemon.http.get(f"/plan/{name}").json()["command"][2] == str(moved)


def test_a_replica_whose_new_plan_is_refused_stops_a_reloads_roll_and_the_other_keeps_serving(
    write_config: ConfigWriter, start_daemon: StartDaemon
) -> None:
    """A reload's new settings that no GPU holds: the first replica's start is refused before any server runs
    (it fails); the roll stops there instead of taking the other replica down too."""
    config = write_config(two_replicas(), gpus=sim_gpus(2))
    daemon = start_daemon(config)
    before = ready_pids(daemon)

    # a KV cache of about 50 GB: no simulated GPU of 24 GiB holds it
    write_config(two_replicas(ctx=100_000_000), gpus=sim_gpus(2), daemon=same_daemon(config))
    assert daemon.http.post("/config/reload").status_code == 200
    assert daemon.instance("tiny@0")["state"] == "failed"
    assert "rolling restart of tiny stopped at tiny@0: " in roll_events(daemon)[-1]
    kept = daemon.instance("tiny@1")
    assert (kept["state"], kept["pid"]) == ("ready", before["tiny@1"])


def _rolling_in_background(daemon: Daemon) -> tuple[ThreadPoolExecutor, Any]:
    """`POST /instances/tiny/restart` sent from a thread; returns once the roll's first replica restarts."""
    first = daemon.instance("tiny@0")["pid"]
    pool = ThreadPoolExecutor(1)

    def restart() -> httpx.Response:
        with httpx.Client(base_url=daemon.url, timeout=120) as http:
            return http.post("/instances/tiny/restart")

    answer = pool.submit(restart)
    poll_until(lambda: daemon.instance("tiny@0"), lambda s: s["pid"] != first, "the roll's first restart", 30)
    return pool, answer


def test_a_replica_a_reload_removes_mid_roll_ends_the_roll_with_an_answer_not_a_crash(
    write_config: ConfigWriter, start_daemon: StartDaemon
) -> None:
    config = write_config({"tiny": {"replicas": 4, "autostart": True}}, gpus=sim_gpus(4))
    daemon = start_daemon(config)
    for name in ("tiny@0", "tiny@1", "tiny@2", "tiny@3"):
        daemon.wait_for(name, lambda s: s["state"] == "ready")
    pool, answer = _rolling_in_background(daemon)
    with pool:
        write_config({"tiny": {"replicas": 3, "autostart": True}}, gpus=sim_gpus(4), daemon=same_daemon(config))
        assert daemon.http.post("/config/reload").status_code == 200  # tiny@3 drained, stopped and gone
        response = answer.result(timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["restarted"] == ["tiny@0", "tiny@1", "tiny@2"]
    assert daemon.http.get("/instances/tiny@3").status_code == 404


def test_a_replica_stopped_by_hand_during_a_roll_stays_stopped(
    write_config: ConfigWriter, start_daemon: StartDaemon
) -> None:
    config = write_config(two_replicas(), gpus=sim_gpus(2))
    daemon = start_daemon(config)
    ready_pids(daemon)
    pool, answer = _rolling_in_background(daemon)
    with pool:
        assert daemon.http.post("/instances/tiny@1/stop").status_code == 202
        response = answer.result(timeout=120)
    assert response.status_code == 200, response.text
    assert daemon.instance("tiny@1")["state"] == "stopped"


def test_the_daemons_stop_ends_a_roll_with_an_error_body(write_config: ConfigWriter, start_daemon: StartDaemon) -> None:
    """SIGTERM during a roll: the roll restarts no further replica and its caller hears why in an ErrorBody
    (before, the roll went on restarting replicas to be stopped, and was cut off by the API's end with a
    plain-text 500 when it took longer than the API's grace)."""
    daemon = start_daemon(write_config(two_replicas(), gpus=sim_gpus(2)))
    ready_pids(daemon)
    pool, answer = _rolling_in_background(daemon)
    with pool:
        daemon.proc.send_signal(signal.SIGTERM)
        response = answer.result(timeout=60)
        assert daemon.proc.wait(60) == 0
    assert response.status_code == 503, response.text
    assert response.json()["detail"] == "the rolling restart of tiny ended unfinished: the daemon is stopping"
