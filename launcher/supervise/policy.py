"""When to restart an instance whose server ended: pure arithmetic over exits and times."""

from __future__ import annotations

from collections import deque

from launcher.config import RestartSettings


class RestartPolicy:
    """Decides, after each exit, whether to start again and after how long.

    A server that crashes after serving is restarted at once the first time: service comes back now.
    Each further crash (or a start that never became ready) within the streak doubles the delay from
    ``backoff_initial`` up to ``backoff_max``. Staying ready for ``reset_after`` ends the streak. More than
    ``burst`` restarts within ``interval`` seconds gives up: the instance is failed until an operator acts.
    """

    def __init__(self, settings: RestartSettings) -> None:
        self._settings = settings
        self._streak = 0
        self._streak_began_ready = False
        self._restarts: deque[float] = deque()

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

    def reset(self) -> None:
        """An operator's start or restart: a fresh budget."""
        self._streak = 0
        self._restarts.clear()
