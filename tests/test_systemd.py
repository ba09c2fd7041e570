"""systemd's side of the daemon: the notify protocol (READY, STATUS, WATCHDOG, STOPPING) on a datagram socket
of the test's own, the decisions behind it, journald's log format, and `systemd-analyze verify` of the
shipped units."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from launcher.config_model import ModelSettings
from launcher.daemon import longest_stop_s
from launcher.schema_gpus import GpuSample
from launcher.schema_instances import InstanceStatus, State
from launcher.systemd import (
    JournalFormatter,
    Notifier,
    sampler_problem,
    status_line,
    under_journal,
    watchdog_interval_s,
)
from tests.conftest import ConfigWriter, Daemon, stop_process
from tests.test_reload import same_daemon

REPO = Path(__file__).resolve().parent.parent
WAIT_S = 30.0

# ---- decisions ----------------------------------------------------------------------------------------


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_pid_only() -> None:
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}, 42) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 42) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 42) is None  # another's
    assert watchdog_interval_s({}, 42) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "soon"}, 42) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}, 42) is None


def test_sampler_is_dead_only_when_no_gpu_has_a_recent_reading() -> None:
    assert sampler_problem([], 1000.0, 4.0) is None  # no GPU
    assert sampler_problem([999.0, 500.0], 1000.0, 4.0) is None  # one GPU hangs: it stalls only itself
    assert sampler_problem([990.0, 980.0], 1000.0, 4.0) == "no GPU reading for 10s"


def sample(index: int, **reading: object) -> GpuSample:
    base = {"index": index, "uuid": f"GPU-{index}", "name": "RTX 3090", "pci_bus_id": None, "vendor": "nvidia"}
    return GpuSample.model_validate({**base, "time": 0.0, **reading})


def status(name: str, state: State) -> InstanceStatus:
    fields = dict.fromkeys(("pid", "port", "vram_mib", "last_exit", "last_exit_code", "last_exit_signal"))
    fields |= {"last_error": None, "uptime_s": None, "log_line": None, "plan": None}
    return InstanceStatus.model_validate(
        {
            **fields,
            **{"name": name, "model": "m", "backend": "llama-server", "state": state, "gpus": [], "tensor_split": []},
            **{"restarts": 0, "autostart": True, "state_age_s": 0.0, "log_path": "", "log_tail": []},
            **{"server_info": {}, "group": name, "events": []},
        }
    )


def test_status_line_counts_instances_and_shows_every_gpu() -> None:
    statuses = [status("a", State.READY), status("b", State.LOADING), status("c", State.STOPPED)]
    gpus = [
        sample(0, temperature_c=71.4, memory_used_mib=20275, memory_total_mib=24576),
        sample(1, error="no reading for 9s: the driver is not answering"),
        sample(2),  # a backend that reads neither temperature nor memory
    ]
    assert status_line(statuses, gpus) == "1/2 ready · GPU0 71°C 19.8/24 GiB · GPU1 error · GPU2"
    assert status_line([status("a", State.READY), status("b", State.FAILED)], []) == "1/2 ready, 1 failed"
    assert status_line([], []) == "0/0 ready"


def test_under_journal_only_when_stderr_is_the_stream_systemd_named(tmp_path: Path) -> None:
    with (tmp_path / "err").open("w") as err, (tmp_path / "other").open("w") as other:
        stat = os.fstat(err.fileno())
        env = {"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}
        assert under_journal(env, err.fileno())
        assert not under_journal(env, other.fileno())  # inherited by something that writes elsewhere
        assert not under_journal({}, err.fileno())
        assert not under_journal({"JOURNAL_STREAM": "garbage"}, err.fileno())


def test_journal_lines_carry_syslog_priorities_and_no_time() -> None:
    formatter = JournalFormatter()

    def line(level: int, message: str) -> str:
        return formatter.format(logging.LogRecord("launcher", level, __file__, 1, message, None, None))

    assert line(logging.INFO, "tiny: ready") == "<6>launcher: tiny: ready"
    assert line(logging.WARNING, "GPU 0: thermal") == "<4>launcher: GPU 0: thermal"
    assert line(logging.ERROR, "one\ntwo") == "<3>launcher: one\n<3>two"  # every journal line keeps it
    assert line(logging.DEBUG, "x").startswith("<7>")


# ---- the notifier on a socket of the test's own -------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.setblocking(False)
        yield sock


async def receive(sock: socket.socket, timeout_s: float = WAIT_S) -> str:
    return (await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 4096), timeout_s)).decode()


async def nothing_within(sock: socket.socket, seconds: float) -> bool:
    try:
        await receive(sock, seconds)
    except TimeoutError:
        return True
    return False


async def test_notifier_status_changes_and_watchdog_cadence(
    notify_socket: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    line = ["starting"]
    problem: list[str | None] = [None]
    notifier = Notifier(notify_socket.getsockname(), watchdog_interval_s=0.05)
    runner = asyncio.create_task(notifier.run(lambda: line[0], lambda: problem[0]))
    try:
        first = {await receive(notify_socket), await receive(notify_socket)}
        assert first == {"WATCHDOG=1", "STATUS=starting"}
        pings: list[float] = []
        while len(pings) < 5:
            if await receive(notify_socket) == "WATCHDOG=1":
                pings.append(time.monotonic())
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert all(0.03 < gap < 0.5 for gap in gaps), gaps  # every interval, not in a burst

        line[0] = "1/1 ready"
        notifier.changed()
        while (message := await receive(notify_socket)) == "WATCHDOG=1":
            pass
        assert message == "STATUS=1/1 ready"

        # The sampler found dead: the watchdog falls silent (systemd will kill and restart), and says why once.
        problem[0] = "no GPU reading for 10s"
        deadline = time.monotonic() + WAIT_S
        while not await nothing_within(notify_socket, 0.3):  # six intervals without a ping (one may be in flight)
            assert time.monotonic() < deadline, "the watchdog kept being pinged"
        assert [r.getMessage() for r in caplog.records] == ["not pinging systemd's watchdog: no GPU reading for 10s"]
        problem[0] = None
        assert await receive(notify_socket) == "WATCHDOG=1"
    finally:
        runner.cancel()
        notifier.close()


def test_notifier_without_systemd_sends_nothing() -> None:
    notifier = Notifier(None, watchdog_interval_s=1.0)
    assert notifier.watchdog_interval_s is None
    assert not notifier.send("READY=1")


# ---- the daemon under a fake systemd ------------------------------------------------------------------


def test_daemon_notifies_ready_status_watchdog_stopping_and_logs_for_journald(
    write_config: ConfigWriter, marked_env: dict[str, str], tmp_path: Path
) -> None:
    address = str(tmp_path / "notify.sock")
    log_path = tmp_path / "daemon.log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener, log_path.open("wb") as log:
        listener.bind(address)
        stat = os.fstat(log.fileno())
        env = marked_env | {
            "NOTIFY_SOCKET": address,
            "WATCHDOG_USEC": "200000",  # a ping every 0.1 s
            "JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}",
        }
        config = write_config({"tiny": {"autostart": True}}, daemon={"ready_when": "loaded"})
        daemon = subprocess.Popen(
            [sys.executable, "-m", "launcher", "--config", str(config), "serve"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            text=True,
        )
        try:
            listener.settimeout(WAIT_S)
            messages: list[str] = []
            while not (messages := [*messages, listener.recv(4096).decode()])[-1].startswith("READY=1"):
                pass
            assert messages[-1] == "READY=1\nSTATUS=1/1 ready"  # ready_when: loaded: the model serves
            assert "WATCHDOG=1" in messages  # the loop pings from the start, before READY

            server = next(c for c in psutil.Process(daemon.pid).children(recursive=True) if "llama" in c.name())
            for variable in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM"):
                assert variable not in server.environ()

            # A frozen daemon sends nothing; once it runs again, the pings come back.
            daemon.send_signal(signal.SIGSTOP)
            while True:  # what was sent before the stop
                listener.settimeout(0.5)
                try:
                    listener.recv(4096)
                except TimeoutError:
                    break
            daemon.send_signal(signal.SIGCONT)
            listener.settimeout(WAIT_S)
            assert listener.recv(4096).decode() == "WATCHDOG=1"

            stop_process(daemon)
            while (message := listener.recv(4096).decode()) == "WATCHDOG=1":
                pass
            assert message == "STOPPING=1"
        finally:
            stop_process(daemon)
    lines = log_path.read_text().splitlines()
    assert "<6>launcher: tiny: ready" in lines  # no time of our own; priority 6 (info)
    assert not server.is_running()


def test_ready_comes_once_a_reload_removed_the_model_it_waited_for(
    write_config: ConfigWriter,
    start_daemon: Callable[[Path], Daemon],
    marked_env: dict[str, str],
    notify_socket: socket.socket,
    standin: Path,
) -> None:
    """daemon.ready_when: loaded waits for the autostart models; one that a reload removes while it loads no
    longer counts (before: the wait ended in a KeyError, READY=1 never came, and systemd would have killed the
    daemon at its TimeoutStartSec)."""
    kept = {"binary": str(standin), "autostart": True}
    loading = {**kept, "env": {"STANDIN_LOAD_S": "120"}}
    config = write_config({"kept": kept, "loading": loading}, daemon={"ready_when": "loaded"})
    marked_env["NOTIFY_SOCKET"] = notify_socket.getsockname()
    daemon = start_daemon(config)
    daemon.wait_for("kept", lambda s: s["state"] == "ready")
    assert daemon.instance("loading")["state"] == "loading"
    write_config({"kept": kept}, daemon=same_daemon(config))

    assert daemon.cli("reload").returncode == 0

    notify_socket.settimeout(WAIT_S)
    while not (message := notify_socket.recv(4096).decode()).startswith("READY=1"):
        pass
    assert message == "READY=1\nSTATUS=1/1 ready"


# ---- the shipped units --------------------------------------------------------------------------------


@pytest.mark.parametrize("unit", ["launcher.service", "launcher-user.service"])
def test_the_units_stop_timeout_outlasts_a_drain_and_the_servers_stop(unit: str) -> None:
    """With the models' defaults; a configuration that drains or stops for longer raises it (docs/service.md)."""
    stop_s = [line for line in (REPO / "systemd" / unit).read_text().splitlines() if line.startswith("TimeoutStopSec=")]
    assert len(stop_s) == 1
    assert float(stop_s[0].removeprefix("TimeoutStopSec=")) >= longest_stop_s([ModelSettings.model_construct()]) + 10


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze")
@pytest.mark.parametrize(("unit", "user"), [("launcher.service", False), ("launcher-user.service", True)])
def test_shipped_units_verify_without_a_word(unit: str, user: bool, tmp_path: Path) -> None:
    # verify exits 0 on unknown keys: its output is the verdict. ExecStart must name a real executable.
    text = (REPO / "systemd" / unit).read_text()
    text = text.replace("/usr/local/bin/launcher", sys.executable).replace("%h/.local/bin/launcher", sys.executable)
    assert sys.executable in text
    path = tmp_path / "launcher.service"
    path.write_text(text)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    result = subprocess.run(
        ["systemd-analyze", *(["--user"] if user else []), "verify", str(path)],
        capture_output=True,
        text=True,
        env=dict(os.environ, XDG_RUNTIME_DIR=str(runtime)),
        timeout=60,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
