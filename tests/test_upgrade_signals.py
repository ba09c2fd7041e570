"""Signals that come while the program is executed again: held (blocked) from just before the exec until the
new program's handlers are in place, so that none is lost or ends it unhandled (before: a SIGHUP was lost, a
SIGTERM ended the new program without a drain, its servers killed by the parent-death signal)."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

import psutil

from tests.conftest import ConfigWriter, Daemon, poll_until
from tests.test_drain import serving
from tests.test_upgrade import program_start, upgraded

StartDaemon = Callable[[Path], Daemon]


def _holds(pid: int, sig: signal.Signals) -> bool:
    """Whether the process's main thread has ``sig`` blocked now (the kernel's SigBlk mask)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    raise AssertionError(f"no SigBlk in /proc/{pid}/status")


def _event_kinds(daemon: Daemon) -> list[str]:
    lines = daemon.http.get("/events", params={"recent": 500, "follow": False}).iter_lines()
    return [json.loads(line.removeprefix("data: "))["kind"] for line in lines if line.startswith("data: ")]


def _upgrade_until_held(daemon: Daemon, sig: signal.Signals) -> None:
    """Ask an upgrade, and wait until ``sig`` is held: in the exec's window, before the new program handles it."""
    daemon.proc.send_signal(signal.SIGUSR2)
    poll_until(lambda: _holds(daemon.proc.pid, sig), bool, f"{sig.name} held across the exec", 30)


def test_a_sighup_during_the_exec_is_a_reload_of_the_new_program(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    daemon = serving(write_config, start_daemon, standin)
    pid = daemon.instance("m")["pid"]
    before = program_start(daemon)
    _upgrade_until_held(daemon, signal.SIGHUP)
    daemon.proc.send_signal(signal.SIGHUP)
    upgraded(daemon, before)
    poll_until(lambda: _event_kinds(daemon), lambda kinds: "reload" in kinds, "the held SIGHUP's reload", 30)
    assert "SIGHUP: the configuration is read again once the daemon has started" in "".join(daemon.log)
    assert daemon.instance("m")["pid"] == pid  # nothing changed: the reload kept it


def test_a_sigterm_during_the_exec_stops_the_new_program_in_order(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    daemon = serving(write_config, start_daemon, standin)
    server = psutil.Process(daemon.instance("m")["pid"])
    _upgrade_until_held(daemon, signal.SIGTERM)
    daemon.proc.send_signal(signal.SIGTERM)
    # Handled: the start is cancelled and the wiring's exit stops the servers (the default action was -15).
    assert daemon.proc.wait(timeout=60) == 0
    server.wait(timeout=10)  # no server outlives it
