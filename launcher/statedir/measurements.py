"""STATE_DIR/measured.json: what running servers measured (launcher/plan/measured.py), by key, and the
driver's share of GPU memory learned per GPU name and driver version.

Read at each use (small, and `launcher plan --forget` may change it under a running daemon), written
whole to a new file renamed over the old (a crash leaves the old or the new, never half). A change (read,
changed, written) holds an flock on `measured.json.lock`: the daemon's record and a `--forget` from the CLI
never write the same temporary file at once, nor does either undo the other's change. A file that is
not what this module writes (a string longer than the launcher writes included) is treated as empty, said
once in the log, and replaced at the next write: a measurement is only a better estimate, and losing one
costs one run's correction.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from launcher.config_yaml import clip
from launcher.plan.measured import Measurement

log = logging.getLogger("launcher")

_KEPT = 256  # measurements: the oldest beyond go (one per model and settings in use is what matters)
_MAX_BYTES = 16 * 1024 * 1024  # a larger file is not ours


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")

    measured: dict[Annotated[str, Field(max_length=64)], Measurement] = {}  # measurement_key's 32 hex digits
    overheads_mib: dict[str, Annotated[int, Field(ge=0, le=2**20)]] = {}  # "GPU NAME|DRIVER" -> MiB


def overhead_key(gpu_name: str, driver: str) -> str:
    return f"{gpu_name}|{driver}"


class MeasurementStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._ignored: tuple[int, int] | None = None  # the (size, mtime) of the last file said to be ignored

    def _read(self) -> _File:
        try:
            with self.path.open("rb") as file:
                text = file.read(_MAX_BYTES + 1)
                stamp = os.fstat(file.fileno())
        except (FileNotFoundError, NotADirectoryError):
            return _File()
        if len(text) > _MAX_BYTES:
            return self._ignore((stamp.st_size, stamp.st_mtime_ns), f"larger than {_MAX_BYTES // 2**20} MiB")
        try:
            return _File.model_validate_json(text)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = clip(".".join(str(part) for part in first["loc"]), 120)
            return self._ignore(
                (stamp.st_size, stamp.st_mtime_ns), f"{where}: {first['msg']}" if where else first["msg"]
            )

    def _ignore(self, stamp: tuple[int, int], why: str) -> _File:
        """No measurement: the file is not one this module writes. Said once per such file (it is read at
        each plan)."""
        if stamp != self._ignored:
            self._ignored = stamp
            log.warning(
                "%s is not what the launcher writes (%s): ignored, plans are estimated until the next "
                "measurement replaces it",
                self.path,
                why,
            )
        return _File()

    @contextlib.contextmanager
    def _changing(self) -> Iterator[_File]:
        """The content, to change in place: written when the block ends, under the lock throughout."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.with_name(f"{self.path.name}.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            content = self._read()
            yield content
            new = self.path.with_name(f".{self.path.name}.{os.getpid()}.new")
            new.write_text(content.model_dump_json(indent=1))
            os.replace(new, self.path)

    def get(self, key: str) -> Measurement | None:
        return self._read().measured.get(key)

    def put(self, key: str, measurement: Measurement) -> None:
        with self._changing() as content:
            content.measured.pop(key, None)
            content.measured[key] = measurement  # the newest last: the oldest go first
            while len(content.measured) > _KEPT:
                del content.measured[next(iter(content.measured))]

    def forget(self, model: str) -> int:
        """Drop every measurement of configured model ``model``; how many there were."""
        if not any(found.model == model for found in self._read().measured.values()):
            return 0  # nothing to change: nothing written (a state directory this user may not write included)
        with self._changing() as content:
            keys = [key for key, found in content.measured.items() if found.model == model]
            for key in keys:
                del content.measured[key]
        return len(keys)

    def overheads_mib(self) -> dict[str, int]:
        return dict(self._read().overheads_mib)

    def put_overhead(self, gpu_name: str, driver: str, mib: int) -> None:
        with self._changing() as content:
            content.overheads_mib[overhead_key(gpu_name, driver)] = mib
