"""One owner per state directory: a second daemon, a foreground `up` and every read-only command leave a
running daemon's servers alone, whether that daemon answers or is frozen; read-only commands without any
daemon write nothing."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import ConfigWriter, Daemon, run_cli

AUTOSTART = {"tiny": {"autostart": True}}


def ready(status: dict[str, Any]) -> bool:
    return bool(status["state"] == "ready")


def registry(daemon: Daemon) -> list[dict[str, Any]]:
    state_dir = daemon.config.parent / "state"
    records: list[dict[str, Any]] = json.loads((state_dir / "children.json").read_text())
    return records


@contextmanager
def frozen(daemon: Daemon) -> Iterator[None]:
    """The daemon stopped (SIGSTOP): it owns its state directory but answers nothing."""
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)


def test_a_second_serve_names_the_owner_and_touches_nothing(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon]
) -> None:
    daemon = start_daemon(write_config(AUTOSTART))
    before = daemon.wait_for("tiny", ready)
    result = daemon.cli("serve")
    assert result.returncode == 1
    assert f"a daemon (pid {daemon.proc.pid}, API {daemon.url}) owns the state directory" in result.stderr
    assert "Traceback" not in result.stderr
    after = daemon.instance("tiny")
    assert (after["pid"], after["state"], after["restarts"]) == (before["pid"], "ready", before["restarts"])
    assert [r["pid"] for r in registry(daemon)] == [before["pid"]]


@pytest.mark.parametrize("command", [["plan", "tiny"], ["up", "tiny"], ["status"], ["serve"]])
def test_a_frozen_daemon_is_reported_not_planned_around(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon], command: list[str]
) -> None:
    daemon = start_daemon(write_config(AUTOSTART))
    before = daemon.wait_for("tiny", ready)
    with frozen(daemon):
        result = daemon.cli(*command)
        assert psutil.Process(before["pid"]).status() != psutil.STATUS_ZOMBIE  # its server lives meanwhile
    assert result.returncode == 1
    expected = (
        f"a daemon (pid {daemon.proc.pid}, API {daemon.url}) owns the state directory"
        if command == ["serve"]
        else f"a daemon (pid {daemon.proc.pid}) owns this state directory but does not answer at {daemon.url}"
    )
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    after = daemon.instance("tiny")
    assert (after["pid"], after["state"], after["restarts"]) == (before["pid"], "ready", before["restarts"])
    assert [r["pid"] for r in registry(daemon)] == [before["pid"]]


def test_read_only_commands_without_a_daemon_write_nothing(
    write_config: ConfigWriter, marked_env: dict[str, str], tmp_path: Path
) -> None:
    config = write_config(gpus={"backend": "sim", "sim": [{"name": "Sim", "memory_mib": 24576}]})
    # What each answers with no daemon: a plan, the GPUs, a clean bill, "no daemon" (1), an empty log.
    expected = {("plan", "tiny"): 0, ("gpus",): 0, ("doctor",): 0, ("status",): 1, ("logs", "tiny"): 0}
    for command, code in expected.items():
        result = run_cli("--config", str(config), *command, env=marked_env)
        assert (result.returncode, "Traceback" in result.stderr) == (code, False), (command, result.stderr)
    assert not (tmp_path / "state").exists()  # no lock, no registry, no log directory
    plan = run_cli("--config", str(config), "plan", "tiny", "--json", env=marked_env)
    assert json.loads(plan.stdout)["devices"][0]["gpu"] == 0


def test_a_killed_daemon_does_not_block_the_next(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon]
) -> None:
    config = write_config(AUTOSTART)
    first = start_daemon(config)
    server = psutil.Process(first.wait_for("tiny", ready)["pid"])
    first.stop(signal.SIGKILL)
    _, alive = psutil.wait_procs([server], timeout=5)  # its parent-death signal, before another daemon looks
    assert alive == []
    second = start_daemon(config)  # the lock died with the first: this one owns the directory
    assert second.wait_for("tiny", ready)["restarts"] == 0
    assert [r["pid"] for r in registry(second)] == [second.instance("tiny")["pid"]]


def test_doctor_reports_a_daemon_that_does_not_answer(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon]
) -> None:
    daemon = start_daemon(write_config(AUTOSTART))
    before = daemon.wait_for("tiny", ready)
    with frozen(daemon):
        result = daemon.cli("doctor", "--json")
    assert result.returncode == 1
    findings = json.loads(result.stdout)
    assert {
        "level": "fail",
        "check": "daemon",
        "message": f"a daemon (pid {daemon.proc.pid}) owns this state directory but does not answer at {daemon.url}",
        "fix": f"it may be starting or stuck: try again, check `journalctl`/its log, or stop pid {daemon.proc.pid}",
    } in findings
    assert daemon.instance("tiny")["pid"] == before["pid"]
