"""What a reload reports is what happened, once it happened: a changed model whose server does not come back
is `failed` with its reason (`launcher reload` exits 1, the event says so), one that did not run is
`updated`; a removal is final (a start racing it spawns nothing); an error after the new settings were
taken comes back in the API's error shape; a stream through the front door survives the reload's restart
of its model. Real daemons, the llama-server stand-in."""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from launcher.config_file import load_settings
from launcher.errors import LauncherError
from launcher.reloading import Reloader
from launcher.schema_reload import ReloadReport
from launcher.supervise.leftovers import INSTANCE_ENV
from tests.conftest import ConfigWriter, Daemon, OpenWired
from tests.test_drain import await_event, completed, draining, events_of, is_state, release, the_rest
from tests.test_front_door import first_event, held

StartDaemon = Callable[[Path], Daemon]


def same_daemon(config: Path) -> dict[str, Any]:
    daemon: dict[str, Any] = yaml.safe_load(config.read_text())["daemon"]
    return daemon


def ready(status: dict[str, Any]) -> bool:
    return bool(status["state"] == "ready")


def reload_events(daemon: Daemon) -> list[str]:
    lines = daemon.http.get("/events", params={"recent": 500, "follow": False}).iter_lines()
    messages = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    return [m["message"] for m in messages if m["kind"] == "reload"]


def test_a_changed_model_that_does_not_come_back_is_failed_with_its_reason(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    never = {"policy": "never"}
    runs = {"binary": str(standin), "autostart": True, "restart": never}
    config = write_config({"runs": runs, "idle": {"binary": str(standin)}})
    daemon = start_daemon(config)
    daemon.wait_for("runs", ready)
    crashing = {**runs, "env": {"STANDIN_CRASH_AT_START": "1"}}
    write_config({"runs": crashing, "idle": {"binary": str(standin), "ctx": 512}}, daemon=same_daemon(config))

    planned = daemon.http.post("/config/reload", params={"dry_run": True}).json()  # the plan, as before
    assert {i["name"]: i["change"] for i in planned["instances"]} == {"runs": "restarted", "idle": "restarted"}
    done = daemon.cli("reload")
    assert done.returncode == 1
    rows = {line.split()[0]: line.split()[1] for line in done.stdout.splitlines()[1:]}
    assert rows == {"runs": "failed", "idle": "updated"}  # idle did not run: it takes them at its next start
    assert "1 change(s) failed: runs: failed:" in done.stderr
    assert "standin: crashing at start" in done.stderr  # the server's own words
    assert daemon.instance("runs")["state"] == "failed"
    event = reload_events(daemon)[-1]
    assert event.startswith("reloaded: ") and "failed runs (env): failed: " in event and "updated idle (ctx)" in event


def test_a_start_racing_a_removal_spawns_nothing(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    """A start asked for while a reload drains the model it removes waits on the instance's lock, then is
    refused: no server runs after the removal, in the table or outside it."""
    config = write_config({"m": {"binary": str(standin), "autostart": True}, "kept": {"binary": str(standin)}})
    daemon = start_daemon(config)
    daemon.wait_for("m", ready)
    events = events_of(daemon, "m")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        with daemon.http.stream("POST", "/v1/chat/completions", json=held("m")) as stream:
            lines = stream.iter_lines()
            first_event(lines)
            port = daemon.instance("m")["port"]
            write_config({"kept": {"binary": str(standin)}}, daemon=same_daemon(config))
            reloading = pool.submit(daemon.http.post, "/config/reload")
            await_event(events, is_state("draining"))
            starting = pool.submit(daemon.http.post, "/instances/m/start")
            time.sleep(1.0)  # no event tells that a request waits on the instance's lock: give it the time
            httpx.post(f"http://127.0.0.1:{port}/release", json={}, timeout=10)
            assert completed(the_rest(lines))
        assert reloading.result(timeout=30).status_code == 200
        refused = starting.result(timeout=30)
    assert refused.status_code == 409, refused.text  # it did wait on the lock: a later start gets 404
    assert refused.json()["detail"] == "m does not start: m was removed from the configuration"
    assert daemon.http.get("/instances/m").status_code == 404
    children = psutil.Process(daemon.proc.pid).children(recursive=True)
    assert not [p for p in children if p.environ().get(INSTANCE_ENV) == "m"]


def test_a_stream_survives_a_reload_that_restarts_its_model_to_its_last_token(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    model = {"binary": str(standin), "autostart": True}
    config = write_config({"m": model})
    daemon = start_daemon(config)
    old_pid = daemon.wait_for("m", ready)["pid"]
    events = events_of(daemon, "m")
    write_config({"m": {**model, "ctx": 512}}, daemon=same_daemon(config))
    with draining(daemon, events, lambda: daemon.cli("reload")) as (lines, reloading, _pool):
        release(daemon, "m")
        assert completed(the_rest(lines))
    done = reloading.result(timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1].split() == ["m", "restarted", "ctx"]
    assert daemon.instance("m")["pid"] not in (None, old_pid)
    assert await_event(events, lambda e: e["kind"] == "drain")["message"].startswith("drained: all 1 request")


async def test_an_error_after_the_settings_were_taken_comes_back_in_the_error_shape(
    write_config: ConfigWriter, open_wired: OpenWired, monkeypatch: pytest.MonkeyPatch
) -> None:
    from launcher.api.app import create_app

    config = write_config({"tiny": {}})
    settings = load_settings(config)
    wired = await open_wired(settings)
    reloader = Reloader(settings, wired)

    async def broken(_report: ReloadReport, *, autostart: bool = True) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(wired.manager, "carry_out", broken)
    write_config({"tiny": {}, "more": {}}, daemon=same_daemon(config))
    api = create_app(settings, wired, reload=lambda dry_run: reloader.reload(dry_run=dry_run))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://127.0.0.1") as http:
        answer = await http.post("/config/reload")
    assert answer.status_code == 500
    said = "the configuration was reloaded in part: unexpected error: RuntimeError: a bug"
    assert answer.json() == {"detail": said, "hint": None}
    with pytest.raises(LauncherError, match="reloaded in part"):
        await reloader.reload()
