"""The router's on-demand loading: starting a model for its requests by the planner's VRAM arithmetic,
stopping idle ones to make room (eviction), letting requests wait for room and starting the waiting models
in collated order (swaps), and the idle timer that stops a model nobody asked for in its idle_ttl_s.

The decisions are launcher/route/choose.py's pure functions; this object gathers their facts from the
models the router keeps and carries out the acts through the manager."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

from launcher.config import Settings
from launcher.errors import ConflictError, LauncherError, StartError
from launcher.events import Bus
from launcher.route import choose
from launcher.route.admission import Admission
from launcher.route.errors import RouteError
from launcher.route.routed import NO_ROOM_RETRY_S, RoutedModel, active, downloading
from launcher.schema_instances import Event
from launcher.supervise.manager import Manager
from launcher.supervise.table import InstanceView

log = logging.getLogger(__name__)
# A model waiting for room this part of its queue_timeout_s holds the busy models in its way to no new
# request, so that they go idle and it starts (llama-swap's bound on its collation's starvation, #612):
# until then a running model serves its requests as they come, without a swap; after it, one in steady use
# would keep the waiting model out until every request of it ended in a 429. The rest of the timeout (and
# the load's) is left for the drain and the start.
_STARVING_PART = 0.5


class OnDemand:
    """``models``: the router's record of each model, shared (the router updates it in place on a reload);
    ``serving``: whether an instance takes requests now (the router's reading); ``spawn``: runs a task the
    router cancels as it closes."""

    def __init__(
        self,
        settings: Settings,
        *,
        models: Mapping[str, RoutedModel],
        admission: Admission,
        instances: Mapping[str, InstanceView],
        events: Bus[Event],
        manager: Manager,
        serving: Callable[[str], bool],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self._settings = settings
        self._models = models
        self._admission = admission
        self._instances = instances
        self._events = events
        self._manager = manager
        self._serving = serving
        self._spawn = spawn
        self._room_changes = 0  # calls of next_swap: a model went idle or an instance changed state
        self._placing = asyncio.Lock()  # one on-demand decision at a time: each sees the last one's start
        self._closing: set[str] = set()  # models being stopped (idle, evicted): given no new request
        self._holding: dict[str, str] = {}  # model held to no new request -> the waiting model it is held for
        self._wake_timer = asyncio.Event()

    def reconfigure(self, settings: Settings) -> None:
        """Take the settings of a reload (router.evict is read at each decision)."""
        self._settings = settings

    def stopping(self, model: str | None) -> bool:
        """``model`` is being stopped (idle, evicted): no request is given to it."""
        return model in self._closing

    def bring_up(self, model: str, routed: RoutedModel) -> None:
        """Start ``model`` for its waiting requests, in the background (see _bring_up)."""
        routed.bringing_up = asyncio.create_task(self._bring_up(model, routed))

    def wake_idle_timer(self) -> None:
        """A request ended or an instance changed state: the idle timer looks again."""
        self._wake_timer.set()

    # ---- on demand --------------------------------------------------------------------------------------

    async def _bring_up(self, model: str, routed: RoutedModel, passed: frozenset[str] = frozenset()) -> None:
        """Start ``model`` for a request, making room first when the router may; the waiting requests get
        the reason when it cannot start. ``passed``: the waiting models next_swap tried before, which wait
        still."""
        failure: RouteError | None = None
        waits = False
        try:
            async with self._placing:
                if not await self._make_room(model, routed):
                    waits = True
                    return  # its requests wait for room (see next_swap)
                self._stop_waiting(routed)
                routed.resident_until_s = time.monotonic() + routed.settings.min_resident_s
                self._events.publish(Event.now("on-demand", f"starting {model} for a request", instance=model))
                for instance in routed.instances:
                    try:
                        if not self._instances[instance].active:
                            await self._manager.start(instance)
                    except ConflictError:
                        pass  # started meanwhile (a start through the API): what the requests wait for
                    except LauncherError as exc:  # a replica that cannot start; the others may
                        code = "no_room" if isinstance(exc, StartError) else "start_failed"
                        reason = exc.message + (f" ({exc.hint})" if exc.hint else "")
                        failure = RouteError(503, reason, code, retry_after_s=NO_ROOM_RETRY_S)
                failure = downloading(model, routed, self._instances) or failure
        except RouteError as exc:
            failure = exc
        except Exception as exc:  # a bug or a file nobody foresaw: the requests are told, the router goes on
            log.exception("starting %s on demand", model)
            failure = RouteError(503, f"{model} could not start: {type(exc).__name__}: {exc}", "start_failed")
        finally:
            routed.bringing_up = None
            if waits:  # the next waiting model may fit where this one does not: not held behind it
                self.next_swap(passed | {model})
        if failure is not None and (failure.code == "downloading" or not active(routed, self._instances)):
            self._admission.fail(model, failure)
            self._stop_waiting(routed)

    async def _make_room(self, model: str, routed: RoutedModel) -> bool:
        """Stop what `choose.make_room` picks so that ``model`` fits beside what runs: True when it may
        start now; False when its requests wait for busy models to go idle (or a resident time to end).
        RouteError when nothing the rules allow to stop would make room."""
        # A model that goes idle while this decides (the planner runs in a thread) calls next_swap before this
        # one waits: seen by the count, the decision is taken again rather than waiting for a wake already gone.
        changes = self._room_changes
        await self._manager.await_vacated(model)  # a server stopped a moment ago: its memory counts as free
        plan_without = self._manager.planner_with_stopped(routed.instances[0])
        residents = [
            choose.Resident(
                other,
                b.last_used_s,
                busy=b.bringing_up is not None or self._admission.busy(other, b.instances),
                priority=b.settings.priority,
                pinned=b.settings.pinned,
                resident_until_s=b.resident_until_s,
            )
            for other, b in self._models.items()
            if other != model and b.settings.on_demand and any(self._instances[i].active for i in b.instances)
        ]
        if self._settings.router.evict == "never":
            residents = []
        instances = {r.name: self._models[r.name].instances for r in residents}

        def fits(stopped: Sequence[str]) -> bool:
            return plan_without([i for name in stopped for i in instances[name]]).fits

        decide = functools.partial(choose.make_room, residents, routed.settings.priority, time.monotonic(), fits)
        room = await self._manager.in_planning_thread(decide)
        if room.stop is None and room.wait:
            self._await_room(model, routed, room, stale=self._room_changes != changes)
            return False
        if room.stop is None:
            plan = await self._manager.in_planning_thread(functools.partial(plan_without, []))
            reason = "; ".join([plan.reason or f"{model} does not fit the GPUs", *room.kept])
            raise RouteError(
                503, f"no room on the GPUs for {model}: {reason}", "no_room", retry_after_s=NO_ROOM_RETRY_S
            )
        for victim in room.stop:
            if self._admission.busy(victim, self._models[victim].instances):  # a request came while the planner ran
                room = choose.Room(None, wait=True, kept=(f"{victim} is busy",), drain=(victim,))
                self._await_room(model, routed, room, stale=self._room_changes != changes)
                return False
            await self._stop_model(victim, f"stopping idle {victim} to make room for {model}", "evict")
        return True

    def _await_room(self, model: str, routed: RoutedModel, room: choose.Room, *, stale: bool) -> None:
        """Let ``model``'s requests wait in its queue until a model in its way goes idle (its requests are
        served first, collated: see next_swap) or its resident time ends; ``stale``: room may have been
        freed since the decision, so it is taken again now."""
        if routed.awaiting_room_s is None:
            routed.awaiting_room_s = time.monotonic()
            why = "; ".join(room.kept)
            self._events.publish(Event.now("on-demand", f"{model} waits for room: {why}", instance=model))
        timed = bool(routed.drains)  # a timer set by an earlier decision of this wait holds them at its time
        routed.drains = room.drain
        self.hold_in_the_way()
        if room.drain and not timed and self._starving_at_s(routed) > time.monotonic():
            self._spawn(self._hold_at(self._starving_at_s(routed)))
        retry_at_s = time.monotonic() if stale else room.retry_at_s
        if retry_at_s is not None:
            self._spawn(self._swap_at(retry_at_s))

    async def _swap_at(self, at_s: float) -> None:
        await asyncio.sleep(max(0.0, at_s - time.monotonic()))
        self.next_swap()

    async def _hold_at(self, at_s: float) -> None:
        await asyncio.sleep(max(0.0, at_s - time.monotonic()))
        self.hold_in_the_way()

    @staticmethod
    def _starving_at_s(routed: RoutedModel) -> float:
        assert routed.awaiting_room_s is not None
        return routed.awaiting_room_s + routed.settings.queue_timeout_s * _STARVING_PART

    def _stop_waiting(self, routed: RoutedModel) -> None:
        """``routed`` waits for room no more (it starts, failed, or its requests left): what it held is not."""
        routed.awaiting_room_s, routed.drains = None, ()
        self.hold_in_the_way()

    def hold_in_the_way(self) -> None:
        """Hold to no new request (`Admission.hold`) the busy models in the way of each model that has waited
        for room past its part of queue_timeout_s; give the others their requests again."""
        now = time.monotonic()
        holding: dict[str, str] = {}
        for name, routed in self._models.items():
            if routed.awaiting_room_s is not None and self._starving_at_s(routed) <= now:
                for other in routed.drains:
                    holding.setdefault(other, name)
        for other, waiting in holding.items():
            if other not in self._holding:
                waited_s = now - (self._models[waiting].awaiting_room_s or now)
                why = f"{other} takes no new request until it is idle: {waiting} waited {waited_s:.1f}s for room"
                self._events.publish(Event.now("on-demand", why, instance=other))
        self._holding = holding
        self._admission.hold(holding)

    def next_swap(self, passed: frozenset[str] = frozenset()) -> None:
        """Start the next model whose requests wait for room, in `choose.collate`'s order: the one whose
        oldest request waits longest (a running model's requests were served meanwhile, without a swap).
        ``passed``: models tried since the last change that wait still; the next one is tried in turn."""
        self._room_changes += 1
        waiting: list[tuple[float, str]] = []
        for name, routed in self._models.items():
            if routed.awaiting_room_s is None or name in passed:
                continue
            if not self._admission.queued(name):  # its requests gave up (timed out, left)
                self._stop_waiting(routed)
                continue
            waiting.append((routed.awaiting_room_s, name))
        running = {name for name, routed in self._models.items() if active(routed, self._instances)}
        order = choose.collate([name for _, name in sorted(waiting)], running)
        if order and order[0] not in running:  # one swap at a time: a waiting model on its way goes first
            routed = self._models[order[0]]
            routed.bringing_up = asyncio.create_task(self._bring_up(order[0], routed, passed))

    # ---- the idle timer ---------------------------------------------------------------------------------

    async def _stop_model(self, model: str, why: str, kind: str) -> None:
        """Stop every instance of an idle model. From the moment it is chosen (checked idle just before,
        with no await between) no request is given to it, so none is cut off; requests that come for it
        meanwhile wait, and start it again when it is on demand (see the router's _follow_events)."""
        self._closing.add(model)
        try:
            self._events.publish(Event.now(kind, why, instance=model))
            for instance in self._models[model].instances:
                with contextlib.suppress(LauncherError):  # stopped meanwhile
                    await self._manager.stop(instance)
        finally:
            self._closing.discard(model)
            self._admission.dispatch(model)

    async def idle_timer(self) -> None:
        """Stop each model whose idle_ttl_s passed without a request, until cancelled."""
        while True:
            self._wake_timer.clear()  # before looking: a change from here on wakes the wait below
            now = time.monotonic()
            uses = [
                choose.Use(name, b.settings.idle_ttl_s, self._admission.busy(name, b.instances), b.last_used_s)
                for name, b in self._models.items()
                if b.settings.idle_ttl_s is not None and any(self._serving(i) for i in b.instances)
            ]
            due, next_s = choose.expired(uses, now)
            for name in due:
                routed = self._models.get(name)
                if routed is None:  # a reload removed it while an earlier one stopped
                    continue
                if self._admission.busy(name, routed.instances):  # a request came while an earlier one stopped
                    continue
                try:
                    await self._stop_model(
                        name, f"stopping {name}: no request for {routed.settings.idle_ttl_s:g}s", "idle"
                    )
                except Exception:  # the timer must outlive one bad stop
                    log.exception("stopping idle %s", name)
            timeout_s = None if next_s is None else max(0.0, next_s - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_timer.wait(), timeout_s)
