"""Draining a server before a planned stop: what is decided (pure) and what the instance waits on.

A planned stop (stop, restart, idle, eviction, thermal, the daemon's own stop) first takes the server out
of the front door (its state `draining`, which the router does not give requests to), then waits for the
requests in flight through the front door to finish, up to the model's `drain_timeout_s`, then stops it.
An unplanned end (a crash, a kill, a hung server killed by its health check) is never drained: nothing
of it goes through here. The wait is the instance's (instance.py); the counts are the front door's
(route/admission.py), read through `InFlight`.
"""

from __future__ import annotations

from typing import Protocol

from launcher.schema_instances import State

# The states a drain begins in: the server serves (a draining one is drained already).
_SERVING = frozenset({State.READY, State.UNHEALTHY})


class InFlight(Protocol):
    """The front door's requests in flight per instance (the instance table's `RequestLoad`)."""

    def on(self, instance: str) -> int: ...

    async def finished(self, instance: str, timeout_s: float) -> int:
        """Wait until no request is in flight on ``instance``, ``timeout_s`` at most; the requests left."""
        ...


def needed(state: State, in_flight: int, timeout_s: float) -> bool:
    """A planned stop waits first: its server serves requests now, and the model allows a wait."""
    return state in _SERVING and in_flight > 0 and timeout_s > 0


def began(in_flight: int, timeout_s: float) -> str:
    return f"draining: no new requests; waiting for {_requests(in_flight)} in flight, {timeout_s:g}s at most"


def ended(in_flight: int, left: int, waited_s: float, timeout_s: float) -> str:
    """How a drain ended, for its event: all finished, or how many were cut at the timeout."""
    if left == 0:
        return f"drained: all {_requests(in_flight)} finished in {waited_s:.2f}s"
    return f"drain timed out after {timeout_s:g}s: {_requests(left)} of {in_flight} cut"


def ended_by_itself(in_flight: int, waited_s: float) -> str:
    """A drain whose server ended by itself (a crash, a kill) before its requests finished: they were cut."""
    return f"drain ended after {waited_s:.2f}s: the server ended by itself with {_requests(in_flight)} in flight"


def _requests(count: int) -> str:
    return f"{count} request" + ("" if count == 1 else "s")
