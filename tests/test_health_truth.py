"""Health that cannot lie: a full state directory, a deleted lock file, a supervision fault and SIGHUP
never leave a server abandoned or the daemon saying ready while nothing runs. Real daemon, real
llama-server; the full disk is a small tmpfs (root only: skipped with the reason otherwise)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from launcher.config_yaml import dump_config_yaml
from launcher.schema_instances import State
from launcher.supervise.health import lost_servers
from launcher.supervise.manager import Manager
from launcher.supervise.process import ExitStatus, ServerProcess
from tests.conftest import READY_TIMEOUT_S, ConfigWriter, Daemon, OpenManager, free_port, poll_until, run_cli

AUTOSTART = {"tiny": {"autostart": True}}
FULL = "No space left on device"
FAILED_WRITE = "cannot write"


def ready(status: dict[str, Any]) -> bool:
    return bool(status["state"] == "ready")


def alive(pid: int | None) -> bool:
    try:
        return pid is not None and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs in the test's tmp dir, unmounted at the end whatever happened."""
    mount = tmp_path / "small"
    mount.mkdir()
    tried = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if tried.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root and CAP_SYS_ADMIN needed): {tried.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=True)  # still open somewhere: detach it


def fill_up(path: Path) -> None:
    """Append to ``path`` until the disk refuses: every free page taken, and the slack in its last one."""
    with path.open("ab", buffering=0) as out:
        for _ in range(1024 * 1024):  # bounded: far more 4 KiB pages than the disk has
            try:
                out.write(b"x" * 4096)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    return
                raise
    raise AssertionError(f"{path}: the disk never filled")


def write_errors(daemon: Daemon) -> float:
    for line in daemon.http.get("/metrics").text.splitlines():
        if line.startswith("launcher_state_write_errors_total "):
            return float(line.split()[1])
    raise AssertionError("no launcher_state_write_errors_total in /metrics")


def storage_events(daemon: Daemon) -> list[str]:
    answer = daemon.http.get("/events", params={"recent": 500, "follow": "false"})
    return [line for line in answer.text.splitlines() if line.startswith("data:") and '"kind":"storage"' in line]


def fill_over_a_grown_log(disk: Path, rotate_above_bytes: int) -> Path:
    """The server's log grown past its rotation size (what a chatty server does, without waiting for it),
    then all of ``disk`` taken: a file of its free pages, and the room left in the log's last page (which
    the server writing on would take). No write there can go through, and the log can no longer be rotated
    away. Returns the file to free the disk with."""
    log, filler = disk / "logs" / "tiny.log", disk / "filler"
    for _ in range(5):
        with log.open("a") as out:
            out.write("server output\n" * 300)
        fill_up(filler)
        fill_up(log)
        if log.stat().st_size > rotate_above_bytes:
            return filler
        filler.unlink()  # a rotation came between: once more
    raise AssertionError("the log was rotated away at every try")


def test_a_full_state_dir_neither_kills_nor_abandons_a_server_and_health_never_lies(
    small_disk: Path, write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon]
) -> None:
    models = {"tiny": {"autostart": True, "health": {"interval": 0.2}}}
    log_max_mib = 0.001
    daemon = start_daemon(write_config(models, daemon={"state_dir": str(small_disk), "log_max_mib": log_max_mib}))
    first = daemon.wait_for("tiny", ready)["pid"]

    # Full while serving: each rotation of the grown log fails, is counted, and is told once.
    filler = fill_over_a_grown_log(small_disk, int(log_max_mib * 1024 * 1024))
    poll_until(lambda: write_errors(daemon), lambda n: n >= 3, "write errors", READY_TIMEOUT_S)
    serving = daemon.instance("tiny")
    assert (serving["state"], serving["pid"], alive(first)) == ("ready", first, True)
    [event] = storage_events(daemon)
    assert FAILED_WRITE in event
    health = daemon.http.get("/health")
    assert health.status_code == 200  # the server serves: a full disk is a warning, not an outage
    assert any(FULL in w for w in health.json()["warnings"])
    assert any(
        line.startswith("warning: cannot write") and FULL in line for line in daemon.cli("status").stdout.splitlines()
    )
    doctor = json.loads(daemon.cli("doctor", "--json").stdout)
    assert any(f["level"] == "warn" and FULL in f["message"] for f in doctor), doctor

    # Killed while full: restarted, and /health never says 200 while no server process lives.
    victim = psutil.Process(first)  # taken before the kill: the daemon may reap it before we look
    os.kill(first, signal.SIGKILL)
    psutil.wait_procs([victim], timeout=10)  # until the daemon has reaped it
    seen = []
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        code = daemon.http.get("/health").status_code
        now = daemon.instance("tiny")  # read after: a 200 above means a live server from here on
        seen.append((code, now["state"]))
        if code == 200:
            assert now["pid"] not in (None, first) and alive(now["pid"]), seen
            break
        assert time.monotonic() < deadline, seen
        time.sleep(0.02)
    assert (now["state"], now["restarts"]) == ("ready", 1)
    assert write_errors(daemon) > 3  # the registry's record of the exit and of the new server, at least
    assert len(storage_events(daemon)) == 1  # still the one streak

    # Space again: the next rotation (the log is still over its size) goes through and ends the streak;
    # the count stays.
    dropped = write_errors(daemon)
    filler.unlink()
    poll_until(lambda: daemon.http.get("/health").json()["warnings"], lambda w: w == [], "warnings", READY_TIMEOUT_S)
    assert "writing to the state directory works again" in storage_events(daemon)[-1]
    assert write_errors(daemon) == dropped
    assert (small_disk / "logs" / "tiny.log.1").stat().st_size > 0
    assert daemon.instance("tiny")["pid"] == now["pid"]


def test_a_deleted_lock_file_does_not_let_a_second_daemon_in(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon], marked_env: dict[str, str], tmp_path: Path
) -> None:
    config = write_config(AUTOSTART)
    daemon = start_daemon(config)
    before = daemon.wait_for("tiny", ready)
    (tmp_path / "state" / "daemon.lock").unlink()
    second = tmp_path / "second.yaml"  # another port: only the state directory is shared
    settings = yaml.safe_load(config.read_text())
    settings["daemon"]["port"] = free_port()
    second.write_text(dump_config_yaml(settings))
    result = run_cli("--config", str(second), "serve", env=marked_env)
    assert result.returncode == 1
    assert f"owns the state directory {tmp_path / 'state'}" in result.stderr
    assert "Traceback" not in result.stderr
    after = daemon.instance("tiny")
    assert (after["pid"], after["state"], after["restarts"]) == (before["pid"], "ready", 0)
    assert alive(before["pid"])
    assert daemon.http.get("/health").status_code == 200


def test_sighup_is_logged_and_reloads_without_stopping(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon]
) -> None:
    daemon = start_daemon(write_config(AUTOSTART))
    before = daemon.wait_for("tiny", ready)
    daemon.proc.send_signal(signal.SIGHUP)
    poll_until(lambda: list(daemon.log), lambda lines: any("reloaded: kept tiny" in x for x in lines), "log", 10)
    assert daemon.proc.poll() is None
    assert daemon.http.get("/health").status_code == 200
    assert daemon.instance("tiny")["pid"] == before["pid"]
    assert sum("SIGHUP" in line for line in daemon.log) == 1


FAULT = "a fault nobody foresaw"


def faulty_stops(monkeypatch: pytest.MonkeyPatch, faults: int) -> None:
    """Stopping a server raises, the next ``faults`` times: a fault in supervision nobody foresaw."""
    stop, left = ServerProcess.stop, [faults]

    async def faulty_stop(proc: ServerProcess, timeout_s: float) -> ExitStatus:
        if left[0] > 0:
            left[0] -= 1
            raise RuntimeError(FAULT)
        return await stop(proc, timeout_s)

    monkeypatch.setattr(ServerProcess, "stop", faulty_stop)


async def ready_manager(write_config: ConfigWriter, open_manager: OpenManager) -> tuple[Manager, int]:
    manager = await open_manager(write_config())
    await manager.start("tiny")
    await manager.get("tiny").wait_until(lambda i: i.state == State.READY, READY_TIMEOUT_S)
    pid = manager.get("tiny").status().pid
    assert pid is not None
    return manager, pid


@pytest.mark.parametrize("faults", [1, 1000])
async def test_a_supervision_fault_goes_through_the_policy_or_fails_never_ready(
    write_config: ConfigWriter, open_manager: OpenManager, monkeypatch: pytest.MonkeyPatch, faults: int
) -> None:
    """Once: the run counts as failed and the restart policy starts it again. Every time: the instance
    ends failed, with no server."""
    manager, first = await ready_manager(write_config, open_manager)
    instance = manager.get("tiny")
    faulty_stops(monkeypatch, faults)
    os.kill(first, signal.SIGKILL)
    if faults == 1:
        await instance.wait_until(lambda i: i.state == State.READY and i.restarts == 1, READY_TIMEOUT_S)
        assert instance.status().pid not in (None, first)
    else:
        await instance.wait_until(lambda i: i.state == State.FAILED, READY_TIMEOUT_S)
        assert instance.status().pid is None
        assert instance.last_error == f"supervision ended by an error: RuntimeError: {FAULT}"
    assert f"supervision error: RuntimeError: {FAULT}" in [e.message for e in instance.events]
    assert lost_servers(manager.instances) == []


async def test_a_stop_whose_supervision_fails_still_stops_and_kills_the_server(
    write_config: ConfigWriter, open_manager: OpenManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager, pid = await ready_manager(write_config, open_manager)
    server = psutil.Process(pid)
    faulty_stops(monkeypatch, 1000)
    status = await manager.stop("tiny")
    assert (status.state, status.pid) == (State.STOPPED, None)
    assert status.last_error == f"supervision ended by an error: RuntimeError: {FAULT}"
    _, alive_after = psutil.wait_procs([server], timeout=10)
    assert alive_after == []
