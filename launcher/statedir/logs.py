"""Per-instance log files: the server's output, appended across restarts with a marker at each start."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

_TAIL_CHUNK = 64 * 1024
_MARKER = "=== launcher "
_START = "starting "


def write_marker(path: Path, text: str) -> None:
    """Append a line that says what the launcher did, so the log reads as one story across restarts."""
    stamp = datetime.now().astimezone().isoformat(timespec="seconds")
    with path.open("a") as log:
        log.write(f"{_MARKER}{stamp}: {text} ===\n")


def write_start_marker(path: Path, text: str) -> None:
    """The marker before a server's start: what `lines_of_last_run` looks for."""
    write_marker(path, _START + text)


def _is_start_marker(line: str) -> bool:
    return line.startswith(_MARKER) and line.partition(": ")[2].startswith(_START)


def lines_of_last_run(path: Path, lines: int) -> list[str]:
    """What the server wrote since its last start (of the log's last ``lines``), without the launcher's
    markers and blank lines."""
    found = tail(path, lines)
    start = max((i for i, line in enumerate(found) if _is_start_marker(line)), default=-1)
    return [line.strip() for line in found[start + 1 :] if line.strip() and not line.startswith(_MARKER)]


def rotate_if_large(path: Path, max_bytes: int, keep: int) -> bool:
    """Copy-truncate: when the log is over ``max_bytes``, shift NAME.log.1.. up, copy the log to
    NAME.log.1 and truncate it. The server keeps its descriptor and, writing with O_APPEND, goes on at
    the new end: nothing is lost and no restart is needed."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    for n in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{n + 1}"))
    copy = path.with_name(f"{path.name}.1")
    try:
        shutil.copyfile(path, copy)
    except OSError:  # a full disk: a partial copy would only take more of it; the log stays as it is
        copy.unlink(missing_ok=True)
        raise
    with path.open("r+b") as log:
        log.truncate(0)
    return True


def tail(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines of the file (fewer if it is short or missing)."""
    if lines <= 0:
        return []
    try:
        with path.open("rb") as log:
            size = log.seek(0, os.SEEK_END)
            chunk = _TAIL_CHUNK
            while True:
                log.seek(max(0, size - chunk))
                data = log.read()
                found = data.splitlines()
                if len(found) > lines or chunk >= size:
                    break
                chunk *= 4
    except FileNotFoundError:
        return []
    return [line.decode(errors="replace") for line in found[-lines:]]


def last_line(path: Path) -> str | None:
    found = tail(path, 1)
    return found[0] if found else None


async def follow(path: Path, poll_s: float = 0.25) -> AsyncIterator[str]:
    """Yield lines appended to the file from now on, forever (the caller stops iterating)."""
    offset = path.stat().st_size if path.exists() else 0
    pending = b""
    while True:
        try:
            with path.open("rb") as log:
                if log.seek(0, os.SEEK_END) < offset:  # truncated or replaced: start over
                    offset = 0
                log.seek(offset)
                data = log.read()
        except FileNotFoundError:
            data = b""
        if data:
            offset += len(data)
            *complete, pending = (pending + data).split(b"\n")
            for line in complete:
                yield line.decode(errors="replace")
        else:
            await asyncio.sleep(poll_s)
