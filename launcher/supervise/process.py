"""One server process: spawned in its own session, output appended to a log, stopped as a group.

The child gets a parent-death signal (SIGKILL), so a daemon killed with SIGKILL does not leave servers
holding VRAM. PR_SET_PDEATHSIG fires when the *thread* that forked the child exits; children are forked
from the event loop's thread, which lives as long as the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from launcher.backends import LaunchSpec

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ExitStatus:
    code: int | None  # exit code, when the process exited
    signal: int | None  # signal number, when a signal ended it

    @classmethod
    def from_returncode(cls, returncode: int) -> ExitStatus:
        return cls(code=None, signal=-returncode) if returncode < 0 else cls(code=returncode, signal=None)

    @property
    def success(self) -> bool:
        return self.code == 0

    def describe(self) -> str:
        if self.signal is not None:
            try:
                return f"killed by {signal.Signals(self.signal).name}"
            except ValueError:
                return f"killed by signal {self.signal}"
        return f"exited with code {self.code}"


def _die_with_parent(parent_pid: int) -> None:
    """Runs in the child between fork and exec."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


class ServerProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc
        self.pid = proc.pid
        self.started_at = time.monotonic()
        self._exit = asyncio.ensure_future(proc.wait())

    @classmethod
    async def spawn(cls, spec: LaunchSpec, log_path: Path) -> ServerProcess:
        parent = os.getpid()
        with log_path.open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                *spec.argv,
                env=spec.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as a group, grandchildren too
                preexec_fn=lambda: _die_with_parent(parent),
            )
        return cls(proc)

    @property
    def running(self) -> bool:
        return not self._exit.done()

    @property
    def exited(self) -> asyncio.Future[int]:
        """Resolves with the return code the moment the process ends (no polling)."""
        return self._exit

    async def wait(self) -> ExitStatus:
        return ExitStatus.from_returncode(await asyncio.shield(self._exit))

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    async def stop(self, timeout_s: float) -> ExitStatus:
        """SIGTERM to the group, wait up to ``timeout_s``, then SIGKILL; always reaps the group's members."""
        if self.running:
            self._signal_group(signal.SIGTERM)
            # A stopped process (SIGSTOP, a debugger) cannot act on SIGTERM until continued; systemd does the same.
            self._signal_group(signal.SIGCONT)
            try:
                await asyncio.wait_for(asyncio.shield(self._exit), timeout_s)
            except TimeoutError:
                self._signal_group(signal.SIGKILL)
        status = await self.wait()
        # The leader is gone; members that ignored SIGTERM (a forked grandchild) must not outlive it.
        self._signal_group(signal.SIGKILL)
        return status
