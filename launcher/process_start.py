"""Whether a process is the one a record names, by its start time as psutil gives it.

psutil's `create_time()` on Linux is the process's start in clock ticks since boot (exact, fixed) plus the
boot time, which the kernel computes at each read of /proc/stat as the wall clock less the time since boot,
in whole seconds: when NTP adjusts the clock, the same process's `create_time()` moves by whole seconds
(psutil#2526, #2541). Compared exactly, a server recorded before such a move is taken for another process:
an upgrade does not take it over, a leftover of a daemon that died is left running. The fraction (the
ticks) never moves, and a clock adjusted by more than `_CLOCK_MOVED_AT_MOST_S` between the record and the
check is taken as another process (each caller also checks what the process runs and whose it is).
"""

from __future__ import annotations

_CLOCK_MOVED_AT_MOST_S = 600
_TICK_S = 0.01  # USER_HZ is 100 on every Linux: a start is a whole number of hundredths of a second


def same_start(recorded_s: float, now_s: float) -> bool:
    """Whether ``now_s`` (a `create_time()` read now) is the start ``recorded_s`` was, the clock moved or not."""
    moved_s = abs(now_s - recorded_s)
    return moved_s <= _CLOCK_MOVED_AT_MOST_S and abs(moved_s - round(moved_s)) < _TICK_S / 2
