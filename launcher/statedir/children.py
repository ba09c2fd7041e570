"""The children file: the records of the servers a daemon runs, written as each starts and ends, and read
back by the next daemon, which stops those still running (launcher/supervise/leftovers.py).

The file is read back after a crash, or after anyone edited it: each record is checked on its own, and
what cannot be used is logged and skipped, so a pid of -1 or "123" never reaches os.killpg.
"""

from __future__ import annotations

import json
import logging
import math
import os
import reprlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields

from launcher.regular_file import read_regular
from launcher.statedir.owner import StateDirLock

log = logging.getLogger("launcher")

_MAX_BYTES = 16 * 2**20  # a record takes about a hundred bytes: a larger file is not ours


@dataclass(frozen=True)
class ChildRecord:
    instance: str
    pid: int
    create_time: float  # the process's start time: a reused pid is not the child
    exe: str  # argv[0]


_FIELDS = tuple(field.name for field in fields(ChildRecord))


def _record(entry: object) -> ChildRecord | str:
    """The record ``entry`` spells, or what is wrong with it."""
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


class ChildrenFile:
    """A state directory's children file. Only the owner of the state directory may have one."""

    def __init__(self, owner: StateDirLock) -> None:
        self.path = owner.state_dir.children_file

    def save(self, records: Iterable[ChildRecord]) -> None:
        """Write the records; an OSError (a full disk) is the caller's to count, and leaves the old file and
        no partial temporary one."""
        temporary = self.path.with_suffix(".tmp")
        try:
            temporary.write_text(json.dumps([asdict(r) for r in records], indent=1))
            os.replace(temporary, self.path)  # atomic: a reader sees the old file or the new one
        except OSError:
            temporary.unlink(missing_ok=True)
            raise

    def load(self) -> list[ChildRecord]:
        """The records of the file, each one checked; what cannot be used is logged and skipped."""
        try:
            data = read_regular(self.path, _MAX_BYTES)
            if len(data) > _MAX_BYTES:
                log.warning("%s is over %d MiB, and is ignored", self.path, _MAX_BYTES >> 20)
                return []
            entries = json.loads(data.decode())
        except FileNotFoundError:
            return []
        # unreadable (a FIFO or a device put in its place among others), not UTF-8, not JSON, nested too deep
        except (OSError, ValueError, RecursionError) as exc:
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
