"""What one instance shows and tells: its state and since when, its last error, its recent events.

Every part of an instance (its run loop, its download, its prompt caches, its plan check) reports through
the one record it was built with, so that each state change is checked, timed and published in one place.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from launcher.schema_instances import Event, State
from launcher.supervise.transitions import check_transition

EVENTS_KEPT = 50


class InstanceRecord:
    def __init__(self, name: str, on_event: Callable[[Event], None]) -> None:
        self.name = name
        self.state = State.STOPPED
        self.state_since_s = time.monotonic()
        self.degraded_reason: str | None = None
        self.last_error: str | None = None
        self.events: deque[Event] = deque(maxlen=EVENTS_KEPT)
        self._on_event = on_event
        self._changed = asyncio.Event()

    def set_state(self, state: State, message: str = "") -> None:
        # A bug raises: in a run, as a failed run (`ServerRuns._run_raised`); elsewhere in the task, the
        # safety net (`ServerRuns._supervision_ended`) leaves it failed; in a request, the request fails.
        check_transition(self.state, state)
        self.degraded_reason = message if state == State.DEGRADED else None
        if state != self.state:
            self.state = state
            self.state_since_s = time.monotonic()
        self.emit("state", message or state.value)

    def record_error(self, message: str) -> None:
        self.last_error = message
        self.emit("error", message)

    def keep_error(self, message: str | None) -> None:
        """The last error without an event of its own: cleared at a start, or the server's words, which the
        exit event that follows carries."""
        self.last_error = message

    def emit(self, kind: str, message: str) -> None:
        event = Event.now(kind, message, instance=self.name, state=self.state)
        self.events.append(event)
        self._changed.set()
        self._on_event(event)

    def changed_quietly(self) -> None:
        """Wake those waiting for a change that is no event (a download's reading between its tenths)."""
        self._changed.set()

    async def next_change(self) -> None:
        """Until the next change from now on."""
        self._changed.clear()
        await self._changed.wait()
