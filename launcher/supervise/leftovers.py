"""The second line of defence against orphans: the servers an earlier daemon left running, stopped.

Servers die with the daemon (parent-death signal), but a daemon killed at the wrong moment, a server
that escaped it, or a crash of the machine's init leaves the children file (launcher/statedir/children.py)
behind. The next daemon start reads it and stops what is still there, and only that: a process counts as
ours only if its pid and its start time match the record and its environment names the instance
(LAUNCHER_INSTANCE, which every server gets), so a reused pid is never touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Collection

import psutil

from launcher.process_start import same_start
from launcher.statedir.children import ChildRecord, ChildrenFile
from launcher.statedir.owner import StateDirLock

log = logging.getLogger("launcher")

# Set in every server's environment: which instance it belongs to.
INSTANCE_ENV = "LAUNCHER_INSTANCE"


class ChildRegistry:
    """The servers a daemon runs, kept in its children file. Only the owner of the state directory may have
    one."""

    def __init__(self, owner: StateDirLock) -> None:
        self._file = ChildrenFile(owner)
        self.path = self._file.path
        # Kept here when a save fails (a full disk: the caller counts it): the next save that works writes them all.
        self._records: dict[int, ChildRecord] = {}

    def add(self, instance: str, pid: int, exe: str) -> None:
        try:
            created = psutil.Process(pid).create_time()
        except psutil.Error:
            return  # gone already: nothing to clean up later
        self._records[pid] = ChildRecord(instance, pid, created, exe)
        self._file.save(self._records.values())

    def remove(self, pid: int) -> None:
        if self._records.pop(pid, None) is not None:
            self._file.save(self._records.values())

    def clean_leftovers(self, timeout_s: float = 5.0, keep: Collection[int] = ()) -> list[str]:
        """Stop the recorded servers that still run (TERM to the group, wait, KILL), but those of the pids
        in ``keep`` (an upgrade hands them over: they stay recorded); describe each stopped."""
        stopped = []
        self._records.clear()
        for record in self._file.load():
            if record.pid in keep:
                self._records[record.pid] = record
                continue
            process = _ours(record)
            if process is None:
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(record.pid, signal.SIGTERM)
            _, alive = psutil.wait_procs([process], timeout=timeout_s)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(record.pid, signal.SIGKILL)  # the group: grandchildren too
            stopped.append(f"{record.instance} (pid {record.pid}{', killed' if alive else ''})")
        try:
            self._file.save(self._records.values())
        except OSError as exc:  # a full disk must not keep the daemon from starting: the next save rewrites it
            log.warning("%s cannot be written now (%s): the servers it lists are stopped", self.path, exc.strerror)
        return stopped


def _ours(record: ChildRecord) -> psutil.Process | None:
    """The recorded process if it is still the same process: same pid, start time and instance."""
    try:
        process = psutil.Process(record.pid)
        started = same_start(record.create_time, process.create_time())
        named = process.environ().get(INSTANCE_ENV) == record.instance
        if started and named and process.status() != psutil.STATUS_ZOMBIE:
            return process
    except psutil.Error:
        pass
    return None
