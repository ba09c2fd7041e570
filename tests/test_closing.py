"""The daemon's own stop (SIGTERM, SIGINT) closes it first: the front door gives no instance a new request
(new and queued ones are answered 503 saying why), no reload runs (the API's is refused, SIGHUP ignored,
the watcher's cancelled) and no server starts, so the stop keeps to `daemon.longest_stop_s`; the requests
in flight finish first (the drain). Real daemon, the llama-server stand-in holding streams open."""

from __future__ import annotations

import concurrent.futures
import signal
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from launcher.config_file import load_settings
from launcher.daemon import longest_stop_s
from tests.conftest import ConfigWriter, Daemon, poll_until
from tests.test_drain import await_event, completed, events_of, events_until, is_state, release, the_rest
from tests.test_front_door import first_event, held

StartDaemon = Callable[[Path], Daemon]


def same_daemon(config: Path) -> dict[str, object]:
    daemon: dict[str, object] = yaml.safe_load(config.read_text())["daemon"]
    return daemon


def test_a_stopping_daemon_serves_no_new_request_and_refuses_reloads(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    """While a stream drains: a request for an idle ready model, one queued behind the stream and a reload
    (API and SIGHUP) are all refused, each saying the daemon is stopping; the stream ends whole."""
    one_at_a_time = {"binary": str(standin), "autostart": True, "max_concurrency": 1}
    config = write_config({"m": one_at_a_time, "idle": {"binary": str(standin), "autostart": True}})
    daemon = start_daemon(config)
    for name in ("m", "idle"):
        daemon.wait_for(name, lambda s: s["state"] == "ready")
    events = events_of(daemon, "m")
    plain = {"messages": [{"role": "user", "content": "Hi"}]}
    with (
        concurrent.futures.ThreadPoolExecutor(1) as pool,
        daemon.http.stream("POST", "/v1/chat/completions", json=held("m")) as stream,
    ):
        lines = stream.iter_lines()
        first_event(lines)
        queued = pool.submit(daemon.http.post, "/v1/chat/completions", json={"model": "m", **plain})
        poll_until(lambda: daemon.instance("m")["requests_queued"], lambda n: n == 1, "queued", 10)
        daemon.proc.send_signal(signal.SIGTERM)
        await_event(events, is_state("draining"))

        behind = queued.result(timeout=10)
        fresh = daemon.http.post("/v1/chat/completions", json={"model": "idle", **plain})
        for answer in (behind, fresh):
            assert answer.status_code == 503, answer.text
            error = answer.json()["error"]
            assert (error["code"], error["type"]) == ("shutting_down", "unavailable_error")
            assert error["message"] == "the launcher is shutting down: the daemon is stopping"
            assert answer.headers["retry-after"] == "5"
        assert daemon.instance("idle")["state"] == "ready"  # idle, never given the request

        refused = daemon.http.post("/config/reload")
        assert refused.status_code == 409
        assert refused.json()["detail"] == "the configuration is not reloaded: the daemon is stopping"
        daemon.proc.send_signal(signal.SIGHUP)
        poll_until(lambda: list(daemon.log), lambda log: any("SIGHUP ignored" in line for line in log), "log", 10)
        release(daemon, "m")
        assert completed(the_rest(lines))
    assert daemon.proc.wait(30) == 0


def test_a_stop_during_a_reloads_restart_starts_no_server_and_keeps_to_its_budget(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    """The watcher's reload is draining a model it restarts when SIGTERM comes: the model is not started
    again (the stop would cut it) and the daemon is gone within `longest_stop_s`."""
    model = {"binary": str(standin), "autostart": True, "drain_timeout_s": 3}
    config = write_config({"m": model}, daemon={"watch_config": True})
    daemon = start_daemon(config)
    log = Path(daemon.wait_for("m", lambda s: s["state"] == "ready")["log_path"])
    budget_s = longest_stop_s(load_settings(config).models.values())
    events = events_of(daemon, "m")
    with daemon.http.stream("POST", "/v1/chat/completions", json=held("m")) as stream:
        lines = stream.iter_lines()
        first_event(lines)
        write_config({"m": {**model, "ctx": 512}}, daemon=same_daemon(config))  # the watcher restarts it
        await_event(events, is_state("draining"))
        began_s = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        the_rest(lines)  # cut when the reload's drain runs out
        seen = events_until(events, is_state("stopped"))
    assert daemon.proc.wait(budget_s + 5) == 0
    assert time.monotonic() - began_s < budget_s
    assert not any(is_state("starting")(event) for event in seen)
    starts = [
        line for line in log.read_text().splitlines() if line.startswith("=== launcher ") and ": starting m " in line
    ]
    assert len(starts) == 1, starts  # the first start alone: no server the stop then cut
