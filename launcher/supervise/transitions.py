"""The moves an instance's state may make, as data: `InstanceRecord.set_state` checks each one against it.

Derived from what supervision does (instance.py, server_runs.py): a start of a hub model whose files are
not in the cache downloads them first; a start request or a restart after backoff starts; a
started server loads, then serves (unhealthy while its health checks fail); a run that ends goes to
backoff, stopped, failed (the restart policy) or degraded (a peer its plan uses went away); a stop or hold
goes through stopping, a planned stop of a serving server through draining first (supervise/drain.py).
Failed is reachable from every state: it is where a refused start and the supervision task's safety net
land, wherever the fault struck. The same state again is no move: it re-announces the state with a new
message (each failed health check, a degraded reason that changed).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from launcher.schema_instances import State

# Where a server that serves may go.
_FROM_SERVING = frozenset({State.BACKOFF, State.STOPPED, State.DEGRADED, State.DRAINING, State.STOPPING, State.FAILED})

ALLOWED: Mapping[State, frozenset[State]] = MappingProxyType(
    {
        State.STOPPED: frozenset({State.STARTING, State.DOWNLOADING, State.DEGRADED, State.FAILED}),
        # A hub model's files fetched before its start: then it starts, or the download failed or was stopped.
        State.DOWNLOADING: frozenset({State.STARTING, State.STOPPED, State.FAILED}),
        State.STARTING: frozenset({State.LOADING, State.BACKOFF, State.STOPPING, State.FAILED}),
        State.LOADING: frozenset({State.READY, State.BACKOFF, State.DEGRADED, State.STOPPING, State.FAILED}),
        State.READY: _FROM_SERVING | {State.UNHEALTHY},
        State.UNHEALTHY: _FROM_SERVING | {State.READY},
        # A drain's server may still end by itself (the restart policy decides) or lose its peer.
        State.DRAINING: frozenset({State.STOPPING, State.BACKOFF, State.STOPPED, State.DEGRADED, State.FAILED}),
        State.BACKOFF: frozenset({State.STARTING, State.STOPPING, State.FAILED}),
        State.FAILED: frozenset({State.STARTING, State.DOWNLOADING, State.STOPPED, State.DEGRADED}),
        State.STOPPING: frozenset({State.STOPPED, State.DEGRADED, State.FAILED}),
        State.DEGRADED: frozenset({State.STARTING, State.DOWNLOADING, State.STOPPED, State.FAILED}),
    }
)


class IllegalTransition(AssertionError):
    """A state change the table does not allow: a bug in supervision, never a user's error."""


def check_transition(old: State, new: State) -> None:
    """Raise IllegalTransition unless ``old`` may move to ``new`` (the same state always may)."""
    if new != old and new not in ALLOWED[old]:
        raise IllegalTransition(f"illegal state transition {old} -> {new}")
