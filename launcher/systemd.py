"""systemd's notify protocol (Type=notify): READY=1, STATUS=..., WATCHDOG=1, STOPPING=1 as datagrams to
$NOTIFY_SOCKET, and journald-friendly log lines.

What to send is decided by pure functions (the status line from instance states and GPU samples; whether
the watchdog may be pinged; the interval systemd asks for); `Notifier`, owned by the daemon, only sends.
The watchdog ping comes from the event loop, after it checked that the GPU sampler still reads: a daemon
whose loop hangs, or whose every GPU reading stopped, falls silent, and systemd kills and restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence

from launcher.schema_gpus import GpuSample
from launcher.schema_instances import InstanceStatus, State

log = logging.getLogger("launcher")

# STATUS= at most this often: a GPU sample per GPU per second would otherwise be a datagram each.
STATUS_INTERVAL_S = 1.0

# ---- decisions ----------------------------------------------------------------------------------------


def watchdog_interval_s(env: Mapping[str, str], pid: int) -> float | None:
    """How often to send WATCHDOG=1 (half of systemd's WatchdogSec), or None: no watchdog for this process
    (WATCHDOG_USEC unset or invalid, or WATCHDOG_PID names another process)."""
    watchdog_pid = env.get("WATCHDOG_PID")
    if watchdog_pid and watchdog_pid != str(pid):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2 / 1e6 if usec > 0 else None


def sampler_problem(sample_times_s: Sequence[float], now_s: float, stale_after_s: float) -> str | None:
    """Why the GPU sampler looks dead, or None. One GPU whose driver hangs stalls only itself, and a
    restart would not cure it: the sampler is dead when no GPU at all has a recent reading."""
    if not sample_times_s:
        return None  # no GPU to read
    age_s = now_s - max(sample_times_s)
    if age_s <= stale_after_s:
        return None
    return f"no GPU reading for {age_s:.0f}s"


def _gib(mib: int) -> str:
    return f"{mib / 1024:.1f}".removesuffix(".0")


def _gpu_part(sample: GpuSample) -> str:
    if sample.error is not None:
        return f"GPU{sample.index} error"
    temperature = "" if sample.temperature_c is None else f" {sample.temperature_c:.0f}°C"
    used, total = sample.memory_used_mib, sample.memory_total_mib
    memory = "" if used is None or total is None else f" {_gib(used)}/{_gib(total)} GiB"
    return f"GPU{sample.index}{temperature}{memory}"


def status_line(statuses: Sequence[InstanceStatus], samples: Sequence[GpuSample]) -> str:
    """One line for `systemctl status`: '2/2 ready · GPU0 71°C 19.8/24 GiB · GPU1 ...'. The count is of
    instances that should run (not stopped); failed ones are named by number."""
    wanted = [s for s in statuses if s.state != State.STOPPED]
    ready = sum(s.state == State.READY for s in wanted)
    failed = sum(s.state == State.FAILED for s in wanted)
    instances = f"{ready}/{len(wanted)} ready" + (f", {failed} failed" if failed else "")
    return " · ".join([instances, *(_gpu_part(s) for s in samples)])


# ---- sending ------------------------------------------------------------------------------------------


class Notifier:
    """Sends to systemd's notify socket; every method is a no-op when not run by systemd (no socket)."""

    def __init__(self, address: str | None, *, watchdog_interval_s: float | None) -> None:
        self.watchdog_interval_s = watchdog_interval_s if address else None
        self._address = "\0" + address[1:] if address and address.startswith("@") else address  # abstract
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if address else None
        self._changed = asyncio.Event()
        self._last_status: str | None = None
        self._status: Callable[[], str] | None = None
        self._silent_because: str | None = None

    @classmethod
    def from_environment(cls) -> Notifier:
        env = os.environ
        return cls(env.get("NOTIFY_SOCKET") or None, watchdog_interval_s=watchdog_interval_s(env, os.getpid()))

    def send(self, message: str) -> bool:
        """Send ``message``; False when there is no socket or systemd did not take it."""
        if self._sock is None or self._address is None:
            return False
        try:
            self._sock.sendto(message.encode(), self._address)
        except OSError as exc:
            log.debug("systemd notify %r failed: %s", message, exc)
            return False
        return True

    def ready(self) -> None:
        """READY=1, with the status line of this moment (no later than the state systemd shows)."""
        line = self._status() if self._status is not None else None
        if self.send("READY=1" if line is None else f"READY=1\nSTATUS={line}"):
            self._last_status = line

    def changed(self) -> None:
        """Something the status line shows changed (an instance's state, a GPU sample)."""
        self._changed.set()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()

    def _send_status(self, status: Callable[[], str]) -> None:
        self._changed.clear()
        line = status()
        if line != self._last_status and self.send(f"STATUS={line}"):
            self._last_status = line

    def _ping(self, problem: str | None) -> None:
        if problem is None:
            self.send("WATCHDOG=1")
        elif problem != self._silent_because:
            log.warning("not pinging systemd's watchdog: %s", problem)
        self._silent_because = problem

    async def run(self, status: Callable[[], str], problem: Callable[[], str | None]) -> None:
        """Keep STATUS= current (on changes, at most every STATUS_INTERVAL_S) and ping the watchdog every
        interval while ``problem()`` finds none; until cancelled."""
        if self._sock is None:
            return
        self._status = status
        loop = asyncio.get_running_loop()
        next_ping_s = loop.time()
        next_status_s = loop.time()
        self._changed.set()
        while True:
            now_s = loop.time()
            if self.watchdog_interval_s is not None and now_s >= next_ping_s:
                self._ping(problem())
                next_ping_s = now_s + self.watchdog_interval_s
            if self._changed.is_set() and now_s >= next_status_s:
                self._send_status(status)
                next_status_s = now_s + STATUS_INTERVAL_S
            wake_s = [next_ping_s] if self.watchdog_interval_s is not None else []
            if self._changed.is_set():
                wake_s.append(next_status_s)  # rate-limited: come back when the next line may go
                await asyncio.sleep(max(0.0, min(wake_s) - now_s))
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), None if not wake_s else max(0.0, min(wake_s) - now_s))


# ---- journald -----------------------------------------------------------------------------------------

# syslog priorities by logging level: journald reads a leading `<N>` as the line's priority.
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def under_journal(env: Mapping[str, str], stderr_fd: int) -> bool:
    """True when stderr is the journal stream systemd set up (JOURNAL_STREAM is `device:inode` of it; a
    child that inherited the variable but writes elsewhere is not)."""
    try:
        device, inode = (int(part) for part in env.get("JOURNAL_STREAM", "").split(":"))
        stat = os.fstat(stderr_fd)
    except (ValueError, OSError):
        return False
    return (stat.st_dev, stat.st_ino) == (device, inode)


class JournalFormatter(logging.Formatter):
    """`<priority>name: message`: journald adds the time, and `journalctl -p warning` filters by it."""

    def format(self, record: logging.LogRecord) -> str:
        priority = next((p for level, p in sorted(_PRIORITY.items()) if record.levelno <= level), 2)
        message = super().format(record).replace("\n", "\n" + f"<{priority}>")  # tracebacks keep the priority
        return f"<{priority}>{record.name}: {message}"
