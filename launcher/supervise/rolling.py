"""Rolling restarts of a model's replicas: one replica at a time, the next only once the one before is ready
again, so the model never has zero replicas serving; a replica that does not come back stops the roll and
the rest keep their old server.

What is decided is pure (`order`, `next_step`, `judge`, the event texts); `roll` carries it out on the
replicas it is given, through the restart act its caller passes (the manager's `restart`, or a reload's
restart with new settings).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from launcher.errors import LauncherError, StartError
from launcher.schema_instances import Event, State
from launcher.schema_reload import RollReport
from launcher.supervise.instance import Instance
from launcher.supervise.table import InstanceTable

# A replica in these states takes the front door's requests (the router serves only ready ones).
_SERVING = frozenset({State.READY})
# A stop asked for, under way or done (a roll's own stops are over before it looks: its replica is done).
_STOPPING = frozenset({State.STOPPED, State.DRAINING, State.STOPPING})
# A replica in these states will serve again by itself (its supervision runs), or is on its way out.
_COMING = frozenset({State.STARTING, State.LOADING, State.UNHEALTHY, State.DRAINING, State.BACKOFF, State.STOPPING})
# A replica that reached one of these after its restart did not come back.
_DID_NOT_COME_BACK = frozenset({State.BACKOFF, State.FAILED, State.DEGRADED})


@dataclass(frozen=True)
class Restart:
    """Restart this replica now."""

    name: str


@dataclass(frozen=True)
class Finished:
    """Every replica was restarted and is back."""


@dataclass(frozen=True)
class Stopped:
    """The roll ends here: ``name`` did not come back, or restarting it would leave none serving."""

    name: str
    reason: str


Step = Restart | Finished | Stopped


@dataclass(frozen=True)
class Verdict:
    """What a replica's state after its restart says: ``done`` (back, or failed with ``failure``) or wait."""

    done: bool
    failure: str | None = None


WAIT = Verdict(done=False)
BACK = Verdict(done=True)


def order(states: Mapping[str, State]) -> list[str]:
    """The replicas (in configured order, with their states at the roll's start) in the order they are
    restarted: those not serving first (restarting them takes nothing away, and each that comes back adds
    to those serving), then the serving ones."""
    return [n for n, s in states.items() if s not in _SERVING] + [n for n, s in states.items() if s in _SERVING]


def left_out(
    order: Sequence[str], done: Collection[str], states_began: Mapping[str, State], states_now: Mapping[str, State]
) -> list[str]:
    """The replicas of ``order`` not yet restarted that the roll passes over: gone from the model (a reload
    removed it) or stopped since the roll began, or on their way there (by hand: a roll does not undo a stop
    asked for meanwhile, nor start what a stop under way is draining; one stopped before the roll began is
    started, as a single instance's restart starts it)."""
    return [
        name
        for name in order
        if name not in done
        and (name not in states_now or (states_now[name] in _STOPPING and states_began.get(name) not in _STOPPING))
    ]


def next_step(
    order: Sequence[str], done: Collection[str], states_now: Mapping[str, State], failure: Stopped | None
) -> Step:
    """What the roll does next: ``done`` are the replicas restarted and back, ``failure`` the one that was
    not (the roll stops there). A serving replica is restarted only while another one serves too, unless
    none of the others is on its way to serving (all stopped or failed: nothing could serve meanwhile, and
    the front door holds its requests in the queue as through the restart of a single instance)."""
    if failure is not None:
        return failure
    left = [name for name in order if name not in done]
    if not left:
        return Finished()
    name = left[0]
    others = {n: s for n, s in states_now.items() if n != name}
    if states_now[name] in _SERVING and not any(s in _SERVING for s in others.values()):
        coming = [n for n, s in others.items() if s in _COMING]
        if coming:
            return Stopped(name, f"it is the only replica serving while {', '.join(coming)} is not ready")
    return Restart(name)


def judge(state: State, policy_restarts: int, last_error: str | None, *, timed_out: bool, timeout_s: float) -> Verdict:
    """A replica after its restart: back once ready (or stopped meanwhile by someone else: nothing to wait
    for); failed once its new server ended before ready (backoff, or restarted by its policy
    since: ``policy_restarts``), failed or degraded, or when not ready within ``timeout_s``."""
    if state in _SERVING or state == State.STOPPED:
        return BACK
    why = f": {last_error}" if last_error else ""
    if state in _DID_NOT_COME_BACK or policy_restarts > 0:
        return Verdict(done=True, failure=f"its new server did not come back ({state.value}){why}")
    if timed_out:
        return Verdict(done=True, failure=f"not ready within {timeout_s:g}s ({state.value})")
    return WAIT


def began(model: str, order: Sequence[str]) -> str:
    return f"rolling restart of {model} began: {', '.join(order)}, one at a time"


def replica_done(name: str, index: int, count: int, took_s: float) -> str:
    return f"{name} restarted and ready in {took_s:.2f}s ({index} of {count})"


# ---- carrying it out ----------------------------------------------------------------------------------


class Rolls:
    """The rolls of the configured models: one model's one after another, never interleaved, and every one
    ended by the daemon's own stop (`end_all`)."""

    def __init__(self, table: InstanceTable, publish: Callable[[Event], None]) -> None:
        """``table``: the instances and each configured model's replicas, as they come and go."""
        self._table = table
        self._publish = publish
        self._locks: dict[str, asyncio.Lock] = {}  # configured model -> held while its replicas roll
        self._stopping = asyncio.Event()

    def end_all(self) -> None:
        """The daemon's own stop began: the rolls under way end, and none begins."""
        self._stopping.set()

    def under_way(self) -> list[str]:
        """The models whose replicas roll now."""
        return [model for model, lock in self._locks.items() if lock.locked()]

    async def roll(self, model: str, names: list[str], act: Callable[[Instance], Awaitable[None]]) -> RollReport:
        """A rolling restart of ``names`` (replicas of ``model``) by ``act`` (`roll_unless`)."""

        def replicas() -> dict[str, Instance]:
            # a replica a reload removes leaves its model at once (the manager's `reconfigure`), before it is
            # stopped: the roll leaves it out from then on, and never starts it again
            members = self._table.groups.get(model, ())
            return {n: self._table.instances[n] for n in names if n in members}

        async with self._locks.setdefault(model, asyncio.Lock()):
            return await roll_unless(self._stopping, model, replicas, act, self._publish)


async def roll_unless(
    stopping: asyncio.Event,
    model: str,
    replicas: Callable[[], Mapping[str, Instance]],
    act: Callable[[Instance], Awaitable[None]],
    publish: Callable[[Event], None],
) -> RollReport:
    """`roll`, ended by ``stopping`` (the daemon's own stop): StartError. A roll then would restart replicas
    only to have them stopped, and its caller would be cut off as the API closes; the replica restarting
    finishes its restart alone."""
    if stopping.is_set():
        raise StartError(f"the rolling restart of {model} did not begin: the daemon is stopping")
    rolled = asyncio.ensure_future(roll(model, replicas, act, publish))
    stopped = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait([rolled, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not rolled.done():
            rolled.cancel()
            await asyncio.wait([rolled])
    if rolled.cancelled():
        message = f"the rolling restart of {model} ended unfinished: the daemon is stopping"
        publish(Event.now("roll", message))
        raise StartError(message)
    return rolled.result()


async def roll(
    model: str,
    replicas: Callable[[], Mapping[str, Instance]],
    act: Callable[[Instance], Awaitable[None]],
    publish: Callable[[Event], None],
) -> RollReport:
    """Restart the ``replicas`` (of configured ``model``, in configured order: those still in the model each
    time it is called) one at a time by ``act``, each awaited ready (its `health.load_timeout` at most)
    before the next; the report says how it ended, and events as it goes (the model's, no instance's; the
    stop's is the replica's). An `act` that raises LauncherError is the replica's failure (its message)."""
    began_s = time.monotonic()
    states_began = {name: i.state for name, i in replicas().items()}
    sequence = order(states_began)
    publish(Event.now("roll", began(model, sequence)))
    done: list[str] = []
    passed: list[str] = []
    failure: Stopped | None = None
    while True:
        now = replicas()
        states_now = {name: i.state for name, i in now.items()}
        if failure is None:  # the one that failed is where the roll stopped, not passed over
            passed = left_out(sequence, done, states_began, states_now)
        step = next_step(sequence, [*done, *passed], states_now, failure)
        if not isinstance(step, Restart):
            break
        instance = now[step.name]
        step_began_s = time.monotonic()
        why = await _restart_and_wait(instance, act)
        if why is not None:
            failure = Stopped(step.name, why)
            continue
        done.append(step.name)
        took_s = time.monotonic() - step_began_s
        publish(Event.now("roll", replica_done(step.name, len(done), len(sequence), took_s)))
    report = RollReport(
        model=model,
        order=sequence,
        restarted=done,
        left_out=passed,
        stopped_at=step.name if isinstance(step, Stopped) else None,
        reason=step.reason if isinstance(step, Stopped) else None,
        duration_s=round(time.monotonic() - began_s, 3),
    )
    # A stop is about the replica that did not come back, whose server's words its reason may quote: what
    # a caller without the API token is shown of them is that replica's (api/redact.py).
    publish(Event.now("roll", report.describe(), instance=report.stopped_at))
    return report


async def _restart_and_wait(instance: Instance, act: Callable[[Instance], Awaitable[None]]) -> str | None:
    """Restart ``instance`` by ``act`` and wait until it is back: None, or why it did not come back."""
    restarts_before = instance.restarts
    try:
        await act(instance)
    except LauncherError as exc:
        return exc.message
    if not instance.active:  # it did not run and was not started (a reload only gave it its settings)
        return None
    timeout_s = instance.settings.health.load_timeout

    def verdict(timed_out: bool) -> Verdict:
        return judge(
            instance.state,
            instance.restarts - restarts_before,
            instance.last_error,
            timed_out=timed_out,
            timeout_s=timeout_s,
        )

    try:
        await instance.wait_until(lambda _: verdict(False).done, timeout_s)
    except TimeoutError:
        return verdict(True).failure
    return verdict(False).failure
