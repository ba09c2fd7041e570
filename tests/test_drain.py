"""Drain before a planned stop (supervise/drain.py), on a real daemon through the front door.

The llama-server stand-in holds a streamed request open after its first event until it is released
(`POST /release` to the server itself: the front door gives a draining server nothing, /upstream neither),
so each test knows the request is in flight when the stop begins and decides when it ends.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx

from launcher.schema_instances import State
from launcher.supervise import drain
from tests.conftest import ConfigWriter, Daemon, poll_until
from tests.test_front_door import first_event, held

StartDaemon = Callable[[Path], Daemon]
Event = dict[str, Any]
T = TypeVar("T")


def events_of(daemon: Daemon, instance: str, *, timeout_s: float = 30) -> Iterator[Event]:
    """The instance's events as they come (the recent ones first), from the daemon's event stream; a
    read that waits longer than ``timeout_s`` for the next one fails the test."""
    with (
        httpx.Client(base_url=daemon.url, timeout=timeout_s) as http,
        http.stream("GET", "/events", params={"recent": 500}) as stream,
    ):
        for line in stream.iter_lines():
            if line.startswith("data: "):
                event: Event = json.loads(line.removeprefix("data: "))
                if event.get("instance") == instance:
                    yield event


def await_event(events: Iterator[Event], match: Callable[[Event], bool]) -> Event:
    for event in events:
        if match(event):
            return event
    raise AssertionError("the event stream ended")


def events_until(events: Iterator[Event], match: Callable[[Event], bool]) -> list[Event]:
    """The events up to the first that ``match``es, that one included (all of them if the stream ends)."""
    seen = []
    for event in events:
        seen.append(event)
        if match(event):
            break
    return seen


def is_state(state: str) -> Callable[[Event], bool]:
    return lambda e: e["kind"] == "state" and e["state"] == state


def release(daemon: Daemon, model: str) -> None:
    """Let the stand-in finish the streams it holds (asked of the server itself)."""
    port = daemon.instance(model)["port"]
    assert httpx.post(f"http://127.0.0.1:{port}/release", json={}, timeout=10).status_code == 200


def the_rest(lines: Iterator[str]) -> list[str]:
    return [line for line in lines if line.startswith("data: ")]


def completed(rest: list[str]) -> bool:
    """The stream ended with its last chunk (finish_reason and usage) and [DONE]."""
    return len(rest) >= 2 and rest[-1] == "data: [DONE]" and "finish_reason" in rest[-2]


@contextlib.contextmanager
def draining(
    daemon: Daemon, events: Iterator[Event], act: Callable[[], T]
) -> Iterator[tuple[Iterator[str], concurrent.futures.Future[T], concurrent.futures.ThreadPoolExecutor]]:
    """A stream of model ``m`` that the stand-in holds open, and ``act`` (a stop, a restart, a reload) run
    beside it until ``m`` is draining: the stream's lines, the act's answer to come, and the pool it runs
    in (for more requests meanwhile)."""
    with (
        concurrent.futures.ThreadPoolExecutor(2) as pool,
        daemon.http.stream("POST", "/v1/chat/completions", json=held("m")) as stream,
    ):
        lines = stream.iter_lines()
        first_event(lines)
        acting = pool.submit(act)
        await_event(events, is_state("draining"))
        yield lines, acting, pool


def serving(write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path, **model: Any) -> Daemon:
    daemon = start_daemon(write_config({"m": {"binary": str(standin), "autostart": True, **model}}))
    daemon.wait_for("m", lambda s: s["state"] == "ready")
    return daemon


def test_a_drain_is_needed_only_for_a_serving_server_with_requests_and_a_wait_allowed() -> None:
    assert drain.needed(State.READY, 1, 30) and drain.needed(State.UNHEALTHY, 2, 0.5)
    assert not drain.needed(State.READY, 0, 30)  # nothing in flight: stopped at once
    assert not drain.needed(State.READY, 1, 0)  # drain_timeout_s: 0
    for state in (State.LOADING, State.BACKOFF, State.DRAINING, State.STOPPING, State.STOPPED):
        assert not drain.needed(state, 1, 30), state  # not serving, or drained already


def test_a_drains_end_says_what_finished_or_was_cut() -> None:
    assert drain.ended(2, 0, 4.104, 30) == "drained: all 2 requests finished in 4.10s"
    assert drain.ended(2, 1, 30.01, 30) == "drain timed out after 30s: 1 request of 2 cut"
    assert drain.began(1, 0.5) == "draining: no new requests; waiting for 1 request in flight, 0.5s at most"


def test_a_stream_survives_a_stop_to_its_last_token_then_the_server_stops(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    daemon = serving(write_config, start_daemon, standin)
    events = events_of(daemon, "m")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with daemon.http.stream("POST", "/v1/chat/completions", json=held("m")) as stream:
            lines = stream.iter_lines()
            first_event(lines)
            stopping = pool.submit(daemon.http.post, "/instances/m/stop")
            draining = await_event(events, is_state("draining"))
            assert "waiting for 1 request in flight" in draining["message"]
            status = daemon.instance("m")
            assert status["state"] == "draining" and status["pid"] is not None and status["requests_in_flight"] == 1
            assert "draining" in daemon.cli("status").stdout
            release(daemon, "m")
            rest = the_rest(lines)
        assert completed(rest)
        assert stopping.result(timeout=30).json()["state"] == "stopped"
    drained = await_event(events, lambda e: e["kind"] == "drain")
    assert drained["message"].startswith("drained: all 1 request finished")
    await_event(events, lambda e: e["kind"] == "exit")  # the server stops after its drain, not before
    assert daemon.instance("m")["pid"] is None


def test_a_stream_survives_a_restart_and_new_requests_wait_for_the_new_server(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    daemon = serving(write_config, start_daemon, standin)
    old_pid = daemon.instance("m")["pid"]
    events = events_of(daemon, "m")
    with draining(daemon, events, lambda: daemon.cli("restart", "m")) as (lines, restarting, pool):
        plain = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
        waiting = pool.submit(daemon.http.post, "/v1/chat/completions", json=plain)
        poll_until(lambda: daemon.instance("m"), lambda s: s["requests_queued"] == 1, "queued", 10)
        release(daemon, "m")
        assert completed(the_rest(lines))
    assert restarting.result(timeout=60).returncode == 0
    answer = waiting.result(timeout=60)
    assert answer.status_code == 200
    assert daemon.instance("m")["pid"] not in (None, old_pid)
    records = [r for r in daemon.http.get("/requests").json() if r["path"] == "/v1/chat/completions"]
    assert [r["status"] for r in records] == [200, 200]


def test_an_idle_stop_waits_for_the_request_in_flight(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    on_demand = {"binary": str(standin), "on_demand": True, "idle_ttl_s": 0.3, "health": {"interval": 0.1}}
    daemon = start_daemon(write_config({"m": on_demand}))
    with daemon.http.stream("POST", "/v1/chat/completions", json=held("m")) as stream:
        lines = stream.iter_lines()
        first_event(lines)
        # Ready for many times its idle_ttl_s with the request held: never stopped meanwhile.
        status = poll_until(lambda: daemon.instance("m"), lambda s: s["uptime_s"] >= 1.5, "ready 1.5 s", 10)
        assert status["state"] == "ready" and status["requests_in_flight"] == 1
        release(daemon, "m")
        assert completed(the_rest(lines))
    events = events_of(daemon, "m")
    await_event(events, lambda e: e["kind"] == "idle")  # after the request, not before
    await_event(events, is_state("stopped"))
    assert daemon.instance("m")["pid"] is None


def test_a_drain_that_runs_out_cuts_the_request_and_says_so(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    daemon = serving(write_config, start_daemon, standin, drain_timeout_s=0.5)
    events = events_of(daemon, "m")
    with daemon.http.stream("POST", "/v1/chat/completions", json=held("m")) as stream:
        lines = stream.iter_lines()
        first_event(lines)
        assert daemon.http.post("/instances/m/stop").json()["state"] == "stopped"
        rest = the_rest(lines)
    assert not completed(rest)  # cut: no last chunk, no [DONE]
    cut = await_event(events, lambda e: e["kind"] == "drain")
    assert cut["message"] == "drain timed out after 0.5s: 1 request of 1 cut"


def test_a_killed_server_is_not_drained(write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path) -> None:
    """kill -9 is no planned stop: the restart policy starts it again at once, though a drain would have
    waited 300 s for the request it was serving."""
    fast = {"policy": "on-failure", "backoff_initial": 0.01, "backoff_max": 0.05}
    daemon = serving(write_config, start_daemon, standin, drain_timeout_s=300, restart=fast)
    old_pid = daemon.instance("m")["pid"]
    events = events_of(daemon, "m")
    with daemon.http.stream("POST", "/v1/chat/completions", json=held("m")) as stream:
        lines = stream.iter_lines()
        first_event(lines)
        os.kill(old_pid, signal.SIGKILL)
        assert not completed(the_rest(lines))
    await_event(events, lambda e: e["kind"] == "exit")
    until_ready = events_until(events, is_state("ready"))
    assert [e["state"] for e in until_ready if e["kind"] == "state"][-1] == "ready"
    assert not any(e["kind"] == "drain" or e["state"] == "draining" for e in until_ready)
    assert daemon.instance("m")["pid"] not in (None, old_pid)


def test_the_daemons_own_stop_drains_first(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    daemon = serving(write_config, start_daemon, standin)
    events = events_of(daemon, "m")
    with daemon.http.stream("POST", "/v1/chat/completions", json=held("m")) as stream:
        lines = stream.iter_lines()
        first_event(lines)
        daemon.proc.send_signal(signal.SIGTERM)
        await_event(events, is_state("draining"))
        assert daemon.instance("m")["state"] == "draining"  # the API still answers meanwhile
        release(daemon, "m")
        assert completed(the_rest(lines))
    drained = await_event(events, lambda e: e["kind"] == "drain")
    assert drained["message"].startswith("drained: all 1 request finished")
    assert daemon.proc.wait(30) == 0


def test_a_server_that_crashes_during_its_drain_is_not_restarted_and_not_said_drained(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    """kill -9 during a stop's drain: the stop goes on (no restart by the policy into a server the stop
    would then cut), and the drain's event says the server ended by itself, not that all finished."""
    fast = {"policy": "on-failure", "backoff_initial": 0.01, "backoff_max": 0.05}
    daemon = serving(write_config, start_daemon, standin, restart=fast)
    pid = daemon.instance("m")["pid"]
    events = events_of(daemon, "m")
    with draining(daemon, events, lambda: daemon.http.post("/instances/m/stop")) as (lines, stopping, _pool):
        os.kill(pid, signal.SIGKILL)
        assert not completed(the_rest(lines))
    assert stopping.result(timeout=30).json()["state"] == "stopped"
    until_stopped = events_until(events, is_state("stopped"))
    drained = [e["message"] for e in until_stopped if e["kind"] == "drain"]
    assert len(drained) == 1 and drained[0].startswith("drain ended after "), drained
    assert drained[0].endswith(": the server ended by itself with 1 request in flight")
    assert not any(is_state("starting")(e) or is_state("backoff")(e) for e in until_stopped)
    assert daemon.instance("m")["pid"] is None
