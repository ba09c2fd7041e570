"""One server process: spawned in its own session, output appended to a log, stopped as a group.

The child gets a parent-death signal (SIGKILL), so a daemon killed with SIGKILL does not leave servers
holding VRAM. It is set by util-linux's `setpriv --pdeathsig KILL`, which execs the server: no Python runs
in the child between fork and exec (a `preexec_fn` there can deadlock a process that has threads, as the
daemon's GPU workers are), and the fork itself takes the fast path. PR_SET_PDEATHSIG fires when the
*thread* that forked the child exits; children are forked from the event loop's thread, which lives as
long as the daemon. It survives the exec, the server's pid is setpriv's, and a recorded pid stays valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path

import psutil

from launcher.backends import LaunchSpec


@functools.cache
def pdeathsig_prefix() -> tuple[str, ...]:
    """What goes in front of a server's argv to give it its parent-death signal: util-linux's setpriv,
    when it takes --pdeathsig (util-linux 2.33 and later; checked once, by running it). Without it servers
    still stop with the daemon in every orderly way, and leftovers of a SIGKILLed daemon are stopped by the
    next one (leftovers.py); `launcher doctor` tells the user."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return ()
    prefix = (setpriv, "--pdeathsig", "KILL", "--")
    try:
        works = subprocess.run([*prefix, sys.executable, "-c", ""], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        works = False
    return prefix if works else ()


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


def dying_with_parent(argv: list[str]) -> list[str]:
    """``argv`` run so that it gets SIGKILL when the thread that forked it ends."""
    return [*pdeathsig_prefix(), *argv]


class ServerProcess:
    def __init__(self, pid: int, exit_code: Awaitable[int]) -> None:
        """``exit_code``: resolves with the return code once the process ended and was reaped."""
        self.pid = pid
        self._exit = asyncio.ensure_future(exit_code)

    @classmethod
    def adopt(cls, pid: int) -> ServerProcess:
        """A child this program did not spawn (the previous program of this process did, before an upgrade
        re-executed it): its end is seen through a pidfd, then it is reaped. OSError where the kernel has no
        pidfd_open (before Linux 5.3) or the process is gone."""
        loop = asyncio.get_running_loop()
        pidfd = os.pidfd_open(pid)
        ended: asyncio.Future[int] = loop.create_future()

        def readable() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            try:
                _, status = os.waitpid(pid, 0)  # it ended: no wait
                code = os.waitstatus_to_exitcode(status)
            except ChildProcessError:  # reaped by someone else: how it ended is unknown
                code = -signal.SIGKILL
            if not ended.done():
                ended.set_result(code)

        loop.add_reader(pidfd, readable)
        return cls(pid, ended)

    @classmethod
    async def spawn(cls, spec: LaunchSpec, log_path: Path) -> ServerProcess:
        with log_path.open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                *dying_with_parent(spec.argv),
                env=spec.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as a group, grandchildren too
            )
        return cls(proc.pid, proc.wait())

    @property
    def running(self) -> bool:
        return not self._exit.done()

    @property
    def alive(self) -> bool:
        """`running`, asked of the system: false as soon as the process is dead, a zombie included."""
        if not self.running:
            return False
        try:
            return psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    @property
    def exited(self) -> asyncio.Future[int]:
        """Resolves with the return code the moment the process ends (no polling)."""
        return self._exit

    async def wait(self) -> ExitStatus:
        return ExitStatus.from_returncode(await asyncio.shield(self._exit))

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL to the group, not waiting: for where nothing can be awaited."""
        self._signal_group(signal.SIGKILL)

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
