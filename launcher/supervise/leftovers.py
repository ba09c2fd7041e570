"""The second line of defence against orphans: a state file of the servers the daemon runs.

Servers die with the daemon (parent-death signal), but a daemon killed at the wrong moment, a server
that escaped it, or a crash of the machine's init leaves the file behind. The next daemon start reads it
and stops what is still there, and only that: a process counts as ours only if its pid and its start time
match the record and its environment names the instance (LAUNCHER_INSTANCE, which every server gets),
so a reused pid is never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from dataclasses import asdict, dataclass

import psutil

from launcher.supervise.owner import StateDirLock

# Set in every server's environment: which instance it belongs to.
INSTANCE_ENV = "LAUNCHER_INSTANCE"


@dataclass(frozen=True)
class ChildRecord:
    instance: str
    pid: int
    create_time: float
    exe: str  # argv[0]


class ChildRegistry:
    """The state file of the servers a daemon runs. Only the owner of the state directory may have one."""

    def __init__(self, owner: StateDirLock) -> None:
        self.path = owner.state_dir / "children.json"
        self._records: dict[int, ChildRecord] = {}

    def _save(self) -> None:
        """Write the records; an OSError (a full disk) is the caller's to count, and leaves the old file and
        no partial temporary one. The records stay here: the next save that works writes them all."""
        temporary = self.path.with_suffix(".tmp")
        try:
            temporary.write_text(json.dumps([asdict(r) for r in self._records.values()], indent=1))
            os.replace(temporary, self.path)  # atomic: a reader sees the old file or the new one
        except OSError:
            temporary.unlink(missing_ok=True)
            raise

    def add(self, instance: str, pid: int, exe: str) -> None:
        try:
            created = psutil.Process(pid).create_time()
        except psutil.Error:
            return  # gone already: nothing to clean up later
        self._records[pid] = ChildRecord(instance, pid, created, exe)
        self._save()

    def remove(self, pid: int) -> None:
        if self._records.pop(pid, None) is not None:
            self._save()

    def _load(self) -> list[ChildRecord]:
        try:
            return [ChildRecord(**entry) for entry in json.loads(self.path.read_text())]
        except (OSError, ValueError, TypeError):
            return []

    def clean_leftovers(self, timeout_s: float = 5.0) -> list[str]:
        """Stop the recorded servers that still run (TERM to the group, wait, KILL); describe each."""
        stopped = []
        for record in self._load():
            process = _ours(record)
            if process is None:
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(record.pid, signal.SIGTERM)
            _, alive = psutil.wait_procs([process], timeout=timeout_s)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(record.pid, signal.SIGKILL)  # the group: grandchildren too
            stopped.append(f"{record.instance} (pid {record.pid}{', killed' if alive else ''})")
        self._records.clear()
        self._save()
        return stopped


def _ours(record: ChildRecord) -> psutil.Process | None:
    """The recorded process if it is still the same process: same pid, start time and instance."""
    try:
        process = psutil.Process(record.pid)
        same_start = abs(process.create_time() - record.create_time) < 0.01
        named = process.environ().get(INSTANCE_ENV) == record.instance
        if same_start and named and process.status() != psutil.STATUS_ZOMBIE:
            return process
    except psutil.Error:
        pass
    return None
