"""Upgrades in place that are refused before anything stops (stand-in servers)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx

from tests.conftest import ConfigWriter, Daemon
from tests.test_drain import serving
from tests.test_upgrade import program_started_at

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
