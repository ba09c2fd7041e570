"""When to restart an instance whose server ended: pure arithmetic over exits and times."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from launcher.config_supervision import RestartSettings


@dataclass(frozen=True)
class StartFailure:
    """A server that ended before it was ready: its own error, and what the start was made of (its
    command line and environment, the size and time of each file the command names)."""

    error: str
    inputs: tuple[object, ...]


class RestartPolicy:
    """Decides, after each exit, whether to start again and after how long.

    A server that crashes after serving is restarted at once the first time: service comes back now.
    Each further crash (or a start that never became ready) within the streak doubles the delay from
    ``backoff_initial`` up to ``backoff_max``. Staying ready for ``reset_after`` ends the streak. More than
    ``burst`` restarts within ``interval`` seconds gives up: the instance is failed until an operator acts.
    A start that fails before ready exactly as the one before it, with nothing changed between, gives up
    at once (`repeats`): the same command on the same files says the same thing again.
    """

    def __init__(self, settings: RestartSettings) -> None:
        self._settings = settings
        self._streak = 0
        self._streak_began_ready = False
        self._restarts: deque[float] = deque()
        self._last_start_failure: StartFailure | None = None

    def use(self, settings: RestartSettings) -> None:
        """Decide by ``settings`` from now on (a reload); the streak and the restarts counted so far stay."""
        self._settings = settings

    def next_delay(self, *, failure: bool, ready_for_s: float | None, now: float) -> float | None:
        """Seconds to wait before restarting, or None to stop restarting.

        ``ready_for_s`` is how long the server was ready before it ended (None: it never became ready).
        """
        s = self._settings
        if s.policy == "never" or (s.policy == "on-failure" and not failure):
            return None
        if ready_for_s is not None and ready_for_s >= s.reset_after:
            self._streak = 0
        if self._streak == 0:
            self._streak_began_ready = ready_for_s is not None
        self._streak += 1
        while self._restarts and now - self._restarts[0] > s.interval:
            self._restarts.popleft()
        if len(self._restarts) >= s.burst:
            return None
        self._restarts.append(now)
        doublings = self._streak - 1 - (1 if self._streak_began_ready else 0)
        if doublings < 0:
            return 0.0
        return float(min(s.backoff_initial * 2**doublings, s.backoff_max))

    def repeats(self, failure: StartFailure | None) -> bool:
        """Whether this run failed before ready exactly as the run before it did. ``failure`` is None for a
        run that became ready (or was ended by the launcher), which ends the comparison."""
        repeated = failure is not None and failure == self._last_start_failure
        self._last_start_failure = failure
        return repeated

    def reset(self) -> None:
        """An operator's start or restart: a fresh budget."""
        self._streak = 0
        self._restarts.clear()
        self._last_start_failure = None
