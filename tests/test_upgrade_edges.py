"""Upgrades in place at their edges: a configuration that does not load, an API stream that never ends
(stand-in servers)."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.conftest import ConfigWriter, Daemon
from tests.test_drain import serving
from tests.test_upgrade import program_started_at, upgraded

StartDaemon = Callable[[Path], Daemon]


def test_an_upgrade_with_a_configuration_that_does_not_load_keeps_the_daemon_and_its_servers(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    """The program executed again reads the file as `serve` does: one that does not load would end the
    daemon, and every server with it (before: 202, then the daemon exited 2 and its servers were killed)."""
    daemon = serving(write_config, start_daemon, standin)
    pid = daemon.instance("m")["pid"]
    before = program_started_at(daemon)
    config = Path(daemon.config)
    config.write_text(config.read_text() + "\nnot_a_key: 1\n")

    answer = httpx.post(f"{daemon.url}/daemon/upgrade", timeout=10)

    assert answer.status_code == 409, answer.text
    assert "not_a_key" in answer.json()["detail"]
    assert daemon.proc.poll() is None and program_started_at(daemon) == before
    assert daemon.instance("m")["pid"] == pid


def test_an_open_event_stream_does_not_hold_the_upgrade_up(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    """A dashboard or `launcher events` follows /events for hours: the API must not stay unanswered for the
    models' drain_timeout_s (30 s by default) while it waits for that stream, which never ends by itself
    (before: 21.7 s here, with drain_timeout_s 20)."""
    daemon = serving(write_config, start_daemon, standin, drain_timeout_s=20)
    pid = daemon.instance("m")["pid"]
    before = program_started_at(daemon)
    assert before is not None
    with daemon.http.stream("GET", "/events", params={"follow": "true"}, timeout=60) as stream:
        assert stream.status_code == 200
        began = time.monotonic()
        daemon.proc.send_signal(signal.SIGUSR2)
        upgraded(daemon, before)
        waited_s = time.monotonic() - began
    assert waited_s < 5, f"the API answered again only after {waited_s:.1f}s"
    assert daemon.instance("m")["pid"] == pid
