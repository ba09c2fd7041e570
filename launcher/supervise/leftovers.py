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
import logging
import math
import os
import reprlib
import signal
from dataclasses import asdict, dataclass, fields

import psutil

from launcher.supervise.owner import StateDirLock

log = logging.getLogger("launcher")

# Set in every server's environment: which instance it belongs to.
INSTANCE_ENV = "LAUNCHER_INSTANCE"


@dataclass(frozen=True)
class ChildRecord:
    instance: str
    pid: int
    create_time: float
    exe: str  # argv[0]


_FIELDS = tuple(field.name for field in fields(ChildRecord))


def _record(entry: object) -> ChildRecord | str:
    """The record ``entry`` spells, or what is wrong with it. The file is read back after a crash, or after
    anyone edited it: a pid of -1 or "123" must not reach os.killpg."""
    if not isinstance(entry, dict):
        return "not a mapping"
    missing = [key for key in _FIELDS if key not in entry]
    if missing:
        return f"no {', '.join(missing)}"
    instance, pid, created, exe = (entry[key] for key in _FIELDS)
    if not isinstance(instance, str) or not isinstance(exe, str):
        return "instance and exe should be strings"
    if type(pid) is not int or not 0 < pid < 2**31:
        return f"pid {reprlib.repr(pid)} is not a process id"
    if type(created) not in (int, float) or not 0 <= created < math.inf:
        return f"create_time {reprlib.repr(created)} is not a time"
    return ChildRecord(instance, pid, float(created), exe)


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
        """The records of the file, each one checked; what cannot be used is logged and skipped."""
        try:
            entries = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError, RecursionError) as exc:  # unreadable, not UTF-8, not JSON, nested too deep
            log.warning("%s cannot be read, and is ignored: %s", self.path, getattr(exc, "strerror", None) or exc)
            return []
        if not isinstance(entries, list):
            log.warning("%s is not a list of servers, and is ignored", self.path)
            return []
        records = []
        for index, entry in enumerate(entries):
            record = _record(entry)
            if isinstance(record, str):
                log.warning("%s: entry %d is skipped, not a server's record: %s", self.path, index, record)
            else:
                records.append(record)
        return records

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
        try:
            self._save()
        except OSError as exc:  # a full disk must not keep the daemon from starting: the next save rewrites it
            log.warning("%s cannot be written now (%s): the servers it lists are stopped", self.path, exc.strerror)
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
