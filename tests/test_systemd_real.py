"""The shipped unit under the real systemd: PID 1 of its own PID and mount namespace, driven by systemctl.

The unit is systemd/launcher.service with only what a test needs changed (see `unit_for_test`): it runs as
root with its files in tmp_path and a short watchdog. Everything the test starts lives in the namespace,
and the namespace goes with the unshare process at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

import launcher
from tests.conftest import MARK, ConfigWriter, marked_processes, poll_until

REPO = Path(launcher.__file__).resolve().parent.parent
SHIPPED_UNIT = REPO / "systemd" / "launcher.service"
SYSTEMD = Path("/lib/systemd/systemd")
CGROUP_ROOT = Path("/sys/fs/cgroup")
WAIT_S = 30.0

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="runs systemd as PID 1 of a namespace: needs root"),
    pytest.mark.skipif(not SYSTEMD.exists(), reason=f"no systemd binary at {SYSTEMD}"),
    pytest.mark.skipif(not shutil.which("unshare") or not shutil.which("nsenter"), reason="needs unshare and nsenter"),
]


def rewrite_unit(text: str, changes: dict[str, dict[str, str | None]]) -> str:
    """``text`` with keys of a section replaced (every line of a key given more than once, like
    DeviceAllow=, goes), removed (None) or added at the end of the section."""
    lines: list[str] = []
    section = ""
    pending: dict[str, str | None] = {}

    def flush() -> None:
        lines.extend(f"{key}={value}" for key, value in pending.items() if value is not None)

    for line in text.splitlines():
        if line.startswith("["):
            flush()
            section = line.strip("[]")
            pending = dict(changes.get(section, {}))
            lines.append(line)
            continue
        key = line.split("=", 1)[0] if "=" in line and not line.startswith("#") else None
        if key is not None and key in changes.get(section, {}):
            value = pending.pop(key, None)
            if value is not None:
                lines.append(f"{key}={value}")
            continue
        lines.append(line)
    flush()
    return "\n".join(lines) + "\n"


def unit_for_test(config: Path, tmp_path: Path, mark: str) -> str:
    """The shipped unit, run by root with its files in tmp_path: the rest (notify, watchdog, kill mode,
    restart, hardening, the system call filter) is what users get."""
    return rewrite_unit(
        SHIPPED_UNIT.read_text(),
        {
            "Unit": {"After": None, "Wants": None, "DefaultDependencies": "no"},
            "Service": {
                "ExecStart": f"{sys.executable} -m launcher --config {config} serve",
                "WatchdogSec": "2",
                "RestartSec": "100ms",
                "User": None,  # root: the test machine has no `launcher` user (nor always a render group)
                "Group": None,
                "SupplementaryGroups": None,
                "StateDirectory": None,  # /var/lib is the host's: the state directory is in tmp_path
                "PrivateTmp": "false",  # tmp_path is under /tmp
                "ReadWritePaths": str(tmp_path),
                "Environment": f'"PYTHONPATH={REPO}" "{MARK}={mark}"',
                "StandardOutput": f"append:{tmp_path / 'daemon.log'}",
                "StandardError": "inherit",
            },
        },
    )


def cgroup_dirs() -> set[Path]:
    return {Path(d) for d, _, _ in os.walk(CGROUP_ROOT)} if CGROUP_ROOT.is_dir() else set()


class Namespace:
    """systemd as PID 1 of a new PID, mount, UTS and IPC namespace, with /run its own tmpfs."""

    def __init__(self, tmp_path: Path, units: dict[str, str], env: dict[str, str]) -> None:
        self.units_dir = tmp_path / "units"
        self.units_dir.mkdir()
        for name, text in units.items():
            (self.units_dir / name).write_text(text)
        (self.units_dir / "test.target").write_text("[Unit]\nDefaultDependencies=no\n")
        script = (
            "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system && "
            f"cp {self.units_dir}/* /run/systemd/system/ && "
            f"exec {SYSTEMD} --system --unit=test.target --log-target=console --log-level=warning"
        )
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--mount-proc", "sh", "-c", script],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=(tmp_path / "systemd.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killed as one at the end
        )
        self.pid = self._init_pid()

    def _init_pid(self) -> int:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            for child in psutil.Process(self.proc.pid).children():
                if Path(f"/proc/{child.pid}/root/run/systemd/private").exists():
                    return child.pid
            assert self.proc.poll() is None, "systemd exited at once"
            time.sleep(0.05)
        raise AssertionError("systemd never opened its private socket")

    def systemctl(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", "-p", "systemctl", *args],
            capture_output=True,
            text=True,
            timeout=WAIT_S,
            stdin=subprocess.DEVNULL,
        )
        assert not check or result.returncode == 0, result.stderr
        return result.stdout

    def show(self, unit: str) -> dict[str, str]:
        keys = "ActiveState,SubState,StatusText,MainPID,NRestarts,ControlGroup,Result"
        out = self.systemctl("show", unit, f"--property={keys}")
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_show(self, unit: str, what: str, predicate: Callable[[dict[str, str]], bool]) -> dict[str, str]:
        return poll_until(lambda: self.show(unit), predicate, f"{unit} ({what})", WAIT_S)

    def host_pid(self, ns_pid: int) -> int:
        """The host's pid of the namespace's process ``ns_pid`` (the last NSpid of /proc/PID/status)."""
        for proc in psutil.Process(self.pid).children(recursive=True):
            with contextlib.suppress(OSError, StopIteration):
                status = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                if int(next(line for line in status if line.startswith("NSpid:")).split()[-1]) == ns_pid:
                    return proc.pid
        raise AssertionError(f"no process {ns_pid} in the namespace")

    def close(self) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired, AssertionError):
            self.systemctl("exit", check=False)
            self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left of the namespace goes with its PID 1
        self.proc.wait(10)


@pytest.fixture
def namespace(tmp_path: Path, marked_env: dict[str, str]) -> Iterator[Callable[[dict[str, str]], Namespace]]:
    before = cgroup_dirs()
    spaces: list[Namespace] = []

    def start(units: dict[str, str]) -> Namespace:
        spaces.append(Namespace(tmp_path, units, marked_env))
        return spaces[-1]

    yield start
    for space in spaces:
        space.close()
    # systemd leaves its init.scope and system.slice in every hierarchy: the deepest first.
    # A cgroup whose last process just died stays busy for a moment: retry, bounded.
    deadline = time.monotonic() + 5.0
    while (left := sorted(cgroup_dirs() - before, key=lambda p: len(p.parts), reverse=True)) and (
        time.monotonic() < deadline
    ):
        for path in left:
            with contextlib.suppress(OSError):
                path.rmdir()
        time.sleep(0.05)
    assert not left, f"cgroups left behind: {left}"


def server_pids(config: Path) -> list[int]:
    port = yaml.safe_load(config.read_text())["daemon"]["port"]
    body = httpx.get(f"http://127.0.0.1:{port}/instances", timeout=10).json()
    return [i["pid"] for i in body if i["pid"] is not None]


def test_the_shipped_unit_under_systemd(
    write_config: ConfigWriter,
    llama_server: Path,
    tmp_path: Path,
    namespace: Callable[[dict[str, str]], Namespace],
    leaves_no_process: str,
) -> None:
    config = write_config({"tiny": {"autostart": True, "binary": str(llama_server)}}, daemon={"ready_when": "loaded"})
    space = namespace({"launcher.service": unit_for_test(config, tmp_path, leaves_no_process)})

    # Type=notify: `systemctl start` returns once READY=1 came, and with ready_when: loaded that is once
    # the model serves.
    space.systemctl("start", "launcher.service")
    shown = space.show("launcher.service")
    assert (shown["ActiveState"], shown["SubState"]) == ("active", "running")
    assert shown["StatusText"].startswith("1/1 ready"), shown
    first_daemon = int(shown["MainPID"])
    (server_ns_pid,) = server_pids(config)
    first_server = psutil.Process(space.host_pid(server_ns_pid))  # is_running() tells a reused pid apart

    # A frozen daemon stops feeding the watchdog: systemd aborts it, its server goes with it, and the
    # unit is restarted with a new daemon and a new server.
    os.kill(space.host_pid(first_daemon), signal.SIGSTOP)
    shown = space.wait_show(
        "launcher.service",
        "restarted after the watchdog",
        lambda s: s["NRestarts"] == "1" and s["SubState"] == "running",
    )
    assert int(shown["MainPID"]) != first_daemon
    assert not first_server.is_running()
    daemon_log = (tmp_path / "daemon.log").read_text()
    assert "Fatal Python error: Aborted" in daemon_log  # SIGABRT, with every thread's stack (faulthandler)

    # kill -9 of the daemon: its server dies with it (parent-death signal, then KillMode's SIGKILL to the
    # cgroup), and systemd restarts the unit.
    second_daemon = int(shown["MainPID"])
    (server_ns_pid,) = server_pids(config)
    second_server = psutil.Process(space.host_pid(server_ns_pid))
    os.kill(space.host_pid(second_daemon), signal.SIGKILL)
    shown = space.wait_show(
        "launcher.service", "restarted after kill -9", lambda s: s["NRestarts"] == "2" and s["SubState"] == "running"
    )
    assert not second_server.is_running()

    stop = space.systemctl("stop", "launcher.service")
    assert stop == ""
    shown = space.show("launcher.service")
    assert shown["ActiveState"] == "inactive"
    # Nothing of the unit is left: only the namespace itself (unshare and systemd) carries the mark.
    assert {p.pid for p in marked_processes(leaves_no_process)} == {space.proc.pid, space.pid}
