"""Writes to the state directory (log markers and rotations, the child registry) that failed.

A full or read-only disk must never end a server's supervision: each such write is tried, a failure is
counted here and the line or record is dropped, and supervision goes on. The first failure after a
success starts a streak, told once; the count is the `launcher_state_write_errors_total` metric; while a
streak lasts it is a warning of `/health`, `launcher status` and `doctor`, and the next write that goes
through ends it (the count stays).
"""

from __future__ import annotations

from collections.abc import Callable


class StateWrites:
    """The daemon's record of failed writes to its state directory."""

    def __init__(self) -> None:
        self.failed_total = 0
        self.streak = 0  # failures since the last write that went through
        self._last_failure = ""

    def attempt(self, what: str, write: Callable[[], object]) -> str | None:
        """Run ``write`` (of the file ``what``); an OSError is counted, not raised. Returns what to tell, if
        anything: the failure that starts a streak, or the write that ends one. ``write`` returns False when
        it had nothing to write (a log under its rotation size): that ends no streak."""
        try:
            wrote = write()
        except OSError as exc:
            self.failed_total += 1
            self.streak += 1
            self._last_failure = f"cannot write {what}: {exc.strerror or exc}"
            if self.streak == 1:
                return f"{self._last_failure}; the servers run on, log lines and records are dropped and counted"
            return None
        if wrote is False or self.streak == 0:
            return None
        ended, self.streak = self.streak, 0
        return f"writing to the state directory works again ({ended} writes were dropped)"

    @property
    def warning(self) -> str | None:
        """The streak under way, in a sentence; None when the last write went through."""
        if self.streak == 0:
            return None
        return f"{self._last_failure} ({self.streak} writes dropped since the last one that went through)"
