"""The table of state moves (launcher/supervise/transitions.py), exactly."""

from __future__ import annotations

import itertools

import pytest

from launcher.schema_instances import State
from launcher.supervise import transitions
from launcher.supervise.health import lost_servers
from launcher.supervise.transitions import ALLOWED, IllegalTransition, check_transition
from tests.conftest import READY_TIMEOUT_S, ConfigWriter, OpenManager

_MOVES = {
    (State.STOPPED, State.STARTING),
    (State.STOPPED, State.DEGRADED),
    (State.STARTING, State.LOADING),
    (State.STARTING, State.BACKOFF),
    (State.STARTING, State.STOPPING),
    (State.LOADING, State.READY),
    (State.LOADING, State.BACKOFF),
    (State.LOADING, State.DEGRADED),
    (State.LOADING, State.STOPPING),
    (State.READY, State.UNHEALTHY),
    (State.READY, State.BACKOFF),
    (State.READY, State.STOPPED),
    (State.READY, State.DEGRADED),
    (State.READY, State.STOPPING),
    (State.UNHEALTHY, State.READY),
    (State.UNHEALTHY, State.BACKOFF),
    (State.UNHEALTHY, State.STOPPED),
    (State.UNHEALTHY, State.DEGRADED),
    (State.UNHEALTHY, State.STOPPING),
    (State.READY, State.DRAINING),
    (State.UNHEALTHY, State.DRAINING),
    (State.DRAINING, State.STOPPING),
    (State.DRAINING, State.BACKOFF),
    (State.DRAINING, State.STOPPED),
    (State.DRAINING, State.DEGRADED),
    (State.BACKOFF, State.STARTING),
    (State.BACKOFF, State.STOPPING),
    (State.FAILED, State.STARTING),
    (State.FAILED, State.STOPPED),
    (State.FAILED, State.DEGRADED),
    (State.STOPPING, State.STOPPED),
    (State.STOPPING, State.DEGRADED),
    (State.DEGRADED, State.STARTING),
    (State.DEGRADED, State.STOPPED),
    # A hub model's first start downloads its files (from a stopped, failed or degraded instance), then
    # starts; a stop ends the download.
    (State.STOPPED, State.DOWNLOADING),
    (State.FAILED, State.DOWNLOADING),
    (State.DEGRADED, State.DOWNLOADING),
    (State.DOWNLOADING, State.STARTING),
    (State.DOWNLOADING, State.STOPPED),
}
# Failed from anywhere (a refused start, the safety net); the same state again re-announces it.
_EXPECTED = _MOVES | {(old, State.FAILED) for old in State if old != State.FAILED} | {(s, s) for s in State}


def test_the_table_is_exactly_the_moves_supervision_makes() -> None:
    assert set(ALLOWED) == set(State)
    table = {(old, new) for old, news in ALLOWED.items() for new in news} | {(s, s) for s in State}
    assert table == _EXPECTED


@pytest.mark.parametrize(("old", "new"), sorted(_EXPECTED))
def test_an_allowed_move_passes(old: State, new: State) -> None:
    check_transition(old, new)


@pytest.mark.parametrize(
    ("old", "new"), sorted(pair for pair in itertools.product(State, State) if pair not in _EXPECTED)
)
def test_any_other_move_is_a_bug_naming_both_states(old: State, new: State) -> None:
    with pytest.raises(IllegalTransition, match=f"^illegal state transition {old} -> {new}$"):
        check_transition(old, new)


def test_serving_needs_a_start_first() -> None:
    for old in (State.STOPPED, State.FAILED, State.BACKOFF, State.DEGRADED, State.STARTING):
        with pytest.raises(IllegalTransition):
            check_transition(old, State.READY)
    assert issubclass(IllegalTransition, AssertionError)  # a bug, never an answer to a user


async def test_an_illegal_move_in_supervision_fails_the_run_and_never_claims_the_state(
    write_config: ConfigWriter, open_manager: OpenManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A table that lacks loading -> ready stands for a bug: the move raises inside the run, which fails
    (told as a supervision error); the instance never says ready and keeps no server."""
    monkeypatch.setattr(transitions, "ALLOWED", {**ALLOWED, State.LOADING: ALLOWED[State.LOADING] - {State.READY}})
    manager = await open_manager(write_config({"tiny": {"restart": {"policy": "never"}}}))
    await manager.start("tiny")
    instance = manager.get("tiny")
    await instance.wait_until(lambda i: i.state == State.FAILED, READY_TIMEOUT_S)
    assert State.READY not in [e.state for e in instance.events]
    assert "supervision error: IllegalTransition: illegal state transition loading -> ready" in [
        e.message for e in instance.events
    ]
    assert instance.status().pid is None
    assert lost_servers(manager.instances) == []
