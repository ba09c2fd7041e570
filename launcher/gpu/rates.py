"""Counters turned into rates (pure functions): NVLink and xGMI throughput are read as running totals."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Count:
    """A counter's value in bytes, read at ``time_s`` (any clock, the same for every reading of it)."""

    total_bytes: float
    time_s: float


def bytes_per_second(previous: Count | None, current: Count) -> float | None:
    """The rate between two readings of one counter; None for the first reading, when no time passed, or
    when the counter went back (the driver reset it or it wrapped): no figure rather than a false one."""
    if previous is None:
        return None
    elapsed_s = current.time_s - previous.time_s
    grown = current.total_bytes - previous.total_bytes
    if elapsed_s <= 0 or grown < 0:
        return None
    return grown / elapsed_s


class Rates:
    """The last reading of each counter, so that each new one gives a rate. Keys are the caller's (GPU,
    link, direction); a reader thread per GPU only touches its own GPU's keys."""

    def __init__(self) -> None:
        self._last: dict[tuple[int, int, str], Count] = {}

    def rate(self, key: tuple[int, int, str], current: Count | None) -> float | None:
        if current is None:
            self._last.pop(key, None)
            return None
        previous, self._last[key] = self._last.get(key), current
        return bytes_per_second(previous, current)
