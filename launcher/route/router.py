"""The front door's owner: which instance serves a request (or why none can), starting on-demand models by
the planner's VRAM arithmetic and stopping idle ones to make room, the idle timer, taking a replica that
failed out until it answers again, and the record of what was served.

Decisions are launcher/route/choose.py's pure functions; the counts and the queue are route/admission.py's;
this object gathers the facts (the instances read through the instance table, the events from the bus)
and carries out the acts through the manager, the only way to a process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import time
from collections import deque
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.types import Send

from launcher.config import Settings
from launcher.config_model import ModelSettings
from launcher.errors import ConflictError, LauncherError, StartError
from launcher.events import Bus
from launcher.route import choose
from launcher.route.admission import Admission
from launcher.route.errors import RouteError
from launcher.route.metrics import RequestMetrics
from launcher.route.peer import PeerForwarder
from launcher.route.proxy import UpstreamClient, UpstreamFailed
from launcher.route.served import Served
from launcher.route.stall import Stalled, StallWatch
from launcher.route.usage import Tokens, of_body
from launcher.route.where import Local, OnPeer, where
from launcher.rpc.peers import Peers
from launcher.schema_front_door import RequestRecord
from launcher.schema_instances import Event, State
from launcher.supervise.manager import Manager
from launcher.supervise.table import InstanceTable

log = logging.getLogger(__name__)

_RECORDS_KEPT = 500
_NO_ROOM_RETRY_S = 10  # Retry-After when the GPUs have no room: a model may go idle by then
_DOWNLOAD_RETRY_MAX_S = 60  # Retry-After while a model downloads: the time left, at most this
_PROBE_S = (0.1, 2.0)  # a failed replica is probed from every 100 ms up to every 2 s until it answers
_SERVING = (State.READY,)
_CLOSED_RETRY_S = 5  # Retry-After while the daemon stops: a service manager may start it again by then


@dataclass
class _RoutedModel:
    """What the router keeps of one configured model."""

    settings: ModelSettings
    instances: list[str]
    last_used_s: float = 0.0  # monotonic: its last request's end, or when it last became ready
    bringing_up: asyncio.Task[None] | None = None
    resident_until_s: float = 0.0  # monotonic: started on demand, not evicted before this (min_resident_s)
    awaiting_room_s: float | None = None  # monotonic: since when its requests wait for others to go idle


class Router:
    """``manager``: the acts (start, stop, a note in an instance's history, planning); ``table``: the
    instances, read, and where the router writes its requests in flight and queued."""

    def __init__(
        self,
        settings: Settings,
        *,
        manager: Manager,
        table: InstanceTable,
        events: Bus[Event],
        peers: Peers | None,
        http: httpx.AsyncClient,
        upstream: UpstreamClient,
    ) -> None:
        self._settings = settings
        self._manager = manager
        self._table = table
        self._instances = table.view
        self._events = events
        self._http = http
        self._upstream = upstream
        # What serves a model; an rpc-server lends GPUs, and is neither listed nor routed to.
        self.configured = {name: m for name, m in settings.models.items() if m.backend != "rpc-server"}
        self._models = {
            name: _RoutedModel(model, list(table.groups.get(name, ()))) for name, model in self.configured.items()
        }
        self.names = {alias: name for name, m in self.configured.items() for alias in (name, *m.aliases)}
        self._group = {i: name for name, routed in self._models.items() for i in routed.instances}
        self.admission = Admission(self._replicas, table.requests, self._prefix_epsilon)
        self._slots: dict[str, int] = {}  # instance -> requests its server takes at once, read when ready
        self._taken_out: dict[str, asyncio.Task[None]] = {}  # instance -> the probe that puts it back
        self._room_changes = 0  # calls of _next_swap: a model went idle or an instance changed state
        self._placing = asyncio.Lock()  # one on-demand decision at a time: each sees the last one's start
        self._closing: set[str] = set()  # models the router is stopping (idle, evicted): given no new request
        self._wake_timer = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.records: deque[RequestRecord] = deque(maxlen=_RECORDS_KEPT)
        self.metrics = RequestMetrics(self._load)
        self.to_peers = PeerForwarder(peers, upstream)  # the peers' models, through the same connections
        self._closed: RouteError | None = None  # the answer to every request once the daemon stops
        self._stalls = StallWatch(http, events, manager.restart, self._spawn)

    def close(self, reason: str) -> None:
        """The daemon is stopping (``reason``): no request is given an instance from now on, so none starts
        that the stop would cut; new ones and those queued are answered 503 saying so. Those in flight
        finish (the servers drain)."""
        self._closed = RouteError(
            503, f"the launcher is shutting down: {reason}", "shutting_down", retry_after_s=_CLOSED_RETRY_S
        )
        for model, routed in self._models.items():
            if routed.bringing_up is not None:
                routed.bringing_up.cancel()
            self.admission.fail(model, self._closed)

    def reconfigure(self, settings: Settings) -> None:
        """Take the settings of a reload, after the manager took them (its instance table says which
        instances each model has now): a kept model keeps its record (last use, a start under way), a
        removed one is dropped with its start under way, probes and slots."""
        self._settings = settings
        self.configured = {name: m for name, m in settings.models.items() if m.backend != "rpc-server"}
        models: dict[str, _RoutedModel] = {}
        for name, model in self.configured.items():
            routed = self._models.get(name) or _RoutedModel(model, [])
            routed.settings, routed.instances = model, list(self._table.groups.get(name, ()))
            models[name] = routed
        for name, routed in self._models.items():
            if name in models:
                continue
            if routed.bringing_up is not None:
                routed.bringing_up.cancel()
            # Its queued requests hear it now, not at their queue's timeout as a 429.
            self.admission.fail(name, RouteError(404, f"{name} was removed from the configuration", "model_not_found"))
        self._models = models
        self.names = {alias: name for name, m in self.configured.items() for alias in (name, *m.aliases)}
        self._group = {i: name for name, routed in self._models.items() for i in routed.instances}
        for instance in [i for i in self._taken_out if i not in self._group]:
            self._taken_out.pop(instance).cancel()
        for instance in [i for i in self._slots if i not in self._group]:
            del self._slots[instance]

    # ---- life -------------------------------------------------------------------------------------------

    async def __aenter__(self) -> Router:
        self._spawn(self._follow_events())
        self._spawn(self._idle_timer())
        return self

    async def __aexit__(self, *_exc: object) -> None:
        for task in [*self._tasks, *self._taken_out.values()]:
            task.cancel()
        for routed in self._models.values():
            if routed.bringing_up is not None:
                routed.bringing_up.cancel()
        await asyncio.gather(*self._tasks, *self._taken_out.values(), return_exceptions=True)
        await self._upstream.close()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- reports ----------------------------------------------------------------------------------------

    def _load(self) -> Iterator[tuple[str, str, int, int]]:
        for model, routed in self._models.items():
            for instance in routed.instances:
                yield model, instance, self.admission.in_flight(instance), self.admission.queued(model)

    def state_of(self, model: str) -> State:
        """The model's state as /v1/models shows it: its best instance's."""
        states = [self._instances[i].state for i in self._models[model].instances]
        order = list(State)  # stopped first, then starting, loading, ready, ...
        return State.READY if State.READY in states else max(states, key=order.index)

    def resolve(self, name: str) -> str:
        """The configured model a request's `model` names (its name or an alias)."""
        try:
            return self.names[name]
        except KeyError:
            known = ", ".join(sorted(self.names)) or "none"
            raise RouteError(404, f"no model named {name!r}; known: {known}", "model_not_found") from None

    def place(self, name: str) -> Local | OnPeer:
        """Where a request's `model` is served: here (a local name or alias wins) or on a peer."""
        return where(name, self.names, self.to_peers.statuses())

    def body_for(self, model: str, doc: dict[str, Any], body: bytes) -> bytes:
        """The request's body as the model's server needs it: Ollama knows the model by its own name."""
        upstream = self._instances[self._models[model].instances[0]].backend.upstream_model()
        if upstream is None or doc["model"] == upstream:
            return body
        return json.dumps({**doc, "model": upstream}).encode()

    # ---- serving ----------------------------------------------------------------------------------------

    async def serve(
        self,
        model: str,
        method: str,
        path: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        send: Send,
        arrived_s: float,
        *,
        queued: bool = True,
        naming: str | None = None,
        prefix: str | None = None,
    ) -> Served:
        """Pass the request to an instance of ``model`` (waiting for one, starting it on demand) and its
        answer back; one retry on another replica when the first could not be reached. ``queued=False``:
        a pass-through to the server (/upstream) that its limit and queue do not hold back, once it serves.
        ``naming``: the name the answer's `model` fields get (the one the client asked for). ``prefix``: the
        request's prefix key, for `routing: prefix`."""
        routed = self._models[model]
        for attempt in (1, 2):
            instance = await self._lease(model, routed, queued, prefix)
            try:
                it = self._instances[instance]
                url = f"http://127.0.0.1:{it.port}{path}"
                forward = functools.partial(
                    self._upstream.forward, method, url, headers, body, arrived_s=arrived_s, naming=naming
                )
                answer = await self._stalls.guard(
                    instance,
                    it.port or 0,
                    it.settings.health,
                    f"{method} {path}",
                    forward,
                    send,
                )
            except Stalled as exc:
                if exc.sent:  # the client has the server's status and the stall's event
                    return Served(status=504, instance=instance)
                raise RouteError(504, exc.reason, "stall", instance=instance) from None
            except UpstreamFailed as exc:
                self._take_out(instance, exc.reason)
                if exc.sent:  # the client has the server's status already; the request failed all the same
                    return Served(status=502, instance=instance)
                if attempt == 2 or not self._other_serving(routed, instance):
                    raise RouteError(
                        502, f"instance {instance} of {model} failed: {exc.reason}", "upstream_failed"
                    ) from None
                continue
            finally:
                self.admission.release(instance)
                routed.last_used_s = time.monotonic()
                self.admission.dispatch(model)
                self._wake_timer.set()
                if not self.admission.busy(model, routed.instances):
                    self._next_swap()
            return Served(status=answer.status, instance=instance, answer=answer)
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _other_serving(self, routed: _RoutedModel, failed: str) -> bool:
        return any(self._serving(i) for i in routed.instances if i != failed)

    def _serving(self, instance: str) -> bool:
        it = self._instances.get(instance)  # None: removed by a reload while a request on it was under way
        return (
            it is not None
            and self._closed is None
            and it.state in _SERVING
            and instance not in self._taken_out
            and self._group.get(instance) not in self._closing
        )

    def _replicas(self, model: str) -> Sequence[choose.Replica]:
        routed = self._models.get(model)
        if routed is None:  # removed by a reload while requests waited for it: they wait out their time
            return []
        limit = routed.settings.max_concurrency
        return [
            choose.Replica(i, self._serving(i), self.admission.in_flight(i), limit or self._slots.get(i, 1))
            for i in routed.instances
        ]

    def _active(self, routed: _RoutedModel) -> bool:
        """Something of the model runs or is on its way (a start, a restart, a restart's backoff)."""
        return routed.bringing_up is not None or any(
            self._instances[i].active or self._instances[i].restarting or self._instances[i].downloading
            for i in routed.instances
        )

    def _downloading(self, model: str, routed: _RoutedModel) -> RouteError | None:
        """The answer while the model's files download (a hub model's first start): 503, how far it is, and
        a Retry-After of the time left (bounded)."""
        for name in routed.instances:
            instance = self._instances[name]
            if instance.state == State.DOWNLOADING:
                download = instance.download
                said = download.describe() if download is not None else "starting"
                eta_s = download.eta_s if download is not None else None
                retry_s = _NO_ROOM_RETRY_S if eta_s is None else max(1, min(int(eta_s) + 1, _DOWNLOAD_RETRY_MAX_S))
                return RouteError(503, f"{model} is downloading: {said}", "downloading", retry_after_s=retry_s)
        return None

    def _prefix_epsilon(self, model: str) -> float | None:
        routed = self._models.get(model)
        if routed is None or routed.settings.routing != "prefix":
            return None
        return routed.settings.routing_epsilon

    async def _lease(self, model: str, routed: _RoutedModel, queued: bool, prefix: str | None) -> str:
        """An instance that takes the request, counted in flight: now, or after a wait in the queue."""
        if self._closed is not None:
            raise self._closed
        taken = self.admission.try_take(model, prefix, unbounded=not queued)
        if taken is not None:
            return taken
        loading = not any(self._serving(i) for i in routed.instances)
        downloading = self._downloading(model, routed)
        if downloading is not None:
            raise downloading
        states = [self._instances[i].state for i in routed.instances]
        if all(state == State.DEGRADED for state in states):  # waits for a peer: no point queueing behind it
            raise self._gone(model)
        if not self._active(routed):
            if not routed.settings.on_demand:
                raise RouteError(
                    503, f"{model} is not running ({self.state_of(model).value}); `launcher up {model}` starts it",
                    "model_not_running", retry_after_s=_NO_ROOM_RETRY_S,
                )  # fmt: skip
            routed.bringing_up = asyncio.create_task(self._bring_up(model, routed))
        # Waiting for a load may take as long as the load may; a queue behind busy replicas, queue_timeout_s.
        timeout_s = routed.settings.queue_timeout_s + (routed.settings.health.load_timeout if loading else 0.0)
        return await self.admission.wait(model, routed.settings.queue_max, timeout_s, prefix)

    # ---- on demand --------------------------------------------------------------------------------------

    async def _bring_up(self, model: str, routed: _RoutedModel, passed: frozenset[str] = frozenset()) -> None:
        """Start ``model`` for a request, making room first when the router may; the waiting requests get
        the reason when it cannot start. ``passed``: the waiting models _next_swap tried before, which wait
        still."""
        failure: RouteError | None = None
        waits = False
        try:
            async with self._placing:
                if not await self._make_room(model, routed):
                    waits = True
                    return  # its requests wait for room (see _next_swap)
                routed.awaiting_room_s = None
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
                        failure = RouteError(503, reason, code, retry_after_s=_NO_ROOM_RETRY_S)
                failure = self._downloading(model, routed) or failure
        except RouteError as exc:
            failure = exc
        except Exception as exc:  # a bug or a file nobody foresaw: the requests are told, the router goes on
            log.exception("starting %s on demand", model)
            failure = RouteError(503, f"{model} could not start: {type(exc).__name__}: {exc}", "start_failed")
        finally:
            routed.bringing_up = None
            if waits:  # the next waiting model may fit where this one does not: not held behind it
                self._next_swap(passed | {model})
        if failure is not None and (failure.code == "downloading" or not self._active(routed)):
            self.admission.fail(model, failure)

    async def _make_room(self, model: str, routed: _RoutedModel) -> bool:
        """Stop what `choose.make_room` picks so that ``model`` fits beside what runs: True when it may
        start now; False when its requests wait for busy models to go idle (or a resident time to end).
        RouteError when nothing the rules allow to stop would make room."""
        # A model that goes idle while this decides (the planner runs in a thread) calls _next_swap before this
        # one waits: seen by the count, the decision is taken again rather than waiting for a wake already gone.
        changes = self._room_changes
        await self._manager.await_vacated(model)  # a server stopped a moment ago: its memory counts as free
        plan_without = self._manager.planner_with_stopped(routed.instances[0])
        residents = [
            choose.Resident(
                other,
                b.last_used_s,
                busy=b.bringing_up is not None or self.admission.busy(other, b.instances),
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
                503, f"no room on the GPUs for {model}: {reason}", "no_room", retry_after_s=_NO_ROOM_RETRY_S
            )
        for victim in room.stop:
            if self.admission.busy(victim, self._models[victim].instances):  # a request came while the planner ran
                room = choose.Room(None, wait=True, kept=(f"{victim} is busy",))
                self._await_room(model, routed, room, stale=self._room_changes != changes)
                return False
            await self._stop_model(victim, f"stopping idle {victim} to make room for {model}", "evict")
        return True

    def _await_room(self, model: str, routed: _RoutedModel, room: choose.Room, *, stale: bool) -> None:
        """Let ``model``'s requests wait in its queue until a model in its way goes idle (its requests are
        served first, collated: see _next_swap) or its resident time ends; ``stale``: room may have been
        freed since the decision, so it is taken again now."""
        if routed.awaiting_room_s is None:
            routed.awaiting_room_s = time.monotonic()
            why = "; ".join(room.kept)
            self._events.publish(Event.now("on-demand", f"{model} waits for room: {why}", instance=model))
        retry_at_s = time.monotonic() if stale else room.retry_at_s
        if retry_at_s is not None:
            self._spawn(self._swap_at(retry_at_s))

    async def _swap_at(self, at_s: float) -> None:
        await asyncio.sleep(max(0.0, at_s - time.monotonic()))
        self._next_swap()

    def _next_swap(self, passed: frozenset[str] = frozenset()) -> None:
        """Start the next model whose requests wait for room, in `choose.collate`'s order: the one whose
        oldest request waits longest (a running model's requests were served meanwhile, without a swap).
        ``passed``: models tried since the last change that wait still; the next one is tried in turn."""
        self._room_changes += 1
        waiting: list[tuple[float, str]] = []
        for name, routed in self._models.items():
            if routed.awaiting_room_s is None or name in passed:
                continue
            if not self.admission.queued(name):  # its requests gave up (timed out, left)
                routed.awaiting_room_s = None
                continue
            waiting.append((routed.awaiting_room_s, name))
        running = {name for name, routed in self._models.items() if self._active(routed)}
        order = choose.collate([name for _, name in sorted(waiting)], running)
        if order and order[0] not in running:  # one swap at a time: a waiting model on its way goes first
            routed = self._models[order[0]]
            routed.bringing_up = asyncio.create_task(self._bring_up(order[0], routed, passed))

    # ---- the idle timer ---------------------------------------------------------------------------------

    async def _stop_model(self, model: str, why: str, kind: str) -> None:
        """Stop every instance of an idle model. From the moment it is chosen (checked idle just before,
        with no await between) no request is given to it, so none is cut off; requests that come for it
        meanwhile wait, and start it again when it is on demand (see _follow_events)."""
        self._closing.add(model)
        try:
            self._events.publish(Event.now(kind, why, instance=model))
            for instance in self._models[model].instances:
                with contextlib.suppress(LauncherError):  # stopped meanwhile
                    await self._manager.stop(instance)
        finally:
            self._closing.discard(model)
            self.admission.dispatch(model)

    async def _idle_timer(self) -> None:
        while True:
            self._wake_timer.clear()  # before looking: a change from here on wakes the wait below
            now = time.monotonic()
            uses = [
                choose.Use(name, b.settings.idle_ttl_s, self.admission.busy(name, b.instances), b.last_used_s)
                for name, b in self._models.items()
                if b.settings.idle_ttl_s is not None and any(self._serving(i) for i in b.instances)
            ]
            due, next_s = choose.expired(uses, now)
            for name in due:
                routed = self._models.get(name)
                if routed is None:  # a reload removed it while an earlier one stopped
                    continue
                if self.admission.busy(name, routed.instances):  # a request came while an earlier one stopped
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

    # ---- what happens to the instances ------------------------------------------------------------------

    async def _follow_events(self) -> None:
        queue = self._events.subscribe()
        try:
            while True:
                event = await queue.get()
                model = self._group.get(event.instance or "")
                if model is None or event.kind != "state":
                    continue
                routed = self._models[model]
                if event.state == State.READY:
                    routed.last_used_s = time.monotonic()
                    self._put_back(event.instance or "")
                    self._spawn(self._read_slots(model, event.instance or ""))
                    self._stalls.forget(event.instance or "")
                if not self._active(routed) and self.admission.queued(model):
                    if not routed.settings.on_demand:
                        self.admission.fail(model, self._gone(model))
                    elif routed.awaiting_room_s is None:  # stopped (idle, evicted) while requests came: again
                        routed.bringing_up = asyncio.create_task(self._bring_up(model, routed))
                self._next_swap()  # what it held (a stop) or waited for (a start) may free a waiting model
                self.admission.dispatch(model)
                self._wake_timer.set()
        finally:
            self._events.unsubscribe(queue)

    def _gone(self, model: str) -> RouteError:
        state = self.state_of(model)
        instances = [self._instances[i] for i in self._models[model].instances]
        why = next((e for i in instances for e in (i.degraded_reason, i.last_error) if e), None)
        text = f"{model} is {state.value}" + (f": {why}" if why else "")
        return RouteError(503, text, "model_not_running", retry_after_s=_NO_ROOM_RETRY_S)

    async def _read_slots(self, model: str, instance: str) -> None:
        """Ask a server that just became ready how many requests it takes at once (one until it says)."""
        it = self._instances[instance]
        if it.port is not None:
            self._slots[instance] = await it.backend.slots(self._http, it.port, it.settings.health.timeout)
            self.admission.dispatch(model)

    def _take_out(self, instance: str, reason: str) -> None:
        """Take a replica that failed a request out until it answers its health check again."""
        if instance in self._taken_out:
            return
        self._manager.note(instance, "warning", f"taken out of the front door: {reason}")
        self._taken_out[instance] = asyncio.create_task(self._probe(instance))

    def _put_back(self, instance: str) -> None:
        probe = self._taken_out.pop(instance, None)
        if probe is not None and probe is not asyncio.current_task():
            probe.cancel()

    async def _probe(self, instance: str) -> None:
        it = self._instances[instance]
        delay_s = _PROBE_S[0]
        while True:
            await asyncio.sleep(delay_s)
            serving = it.state == State.READY and it.port is not None
            if serving and await it.backend.is_ready(self._http, it.port or 0, it.settings.health.timeout):
                break
            delay_s = min(delay_s * 2, _PROBE_S[1])
        self._put_back(instance)
        self.admission.dispatch(self._group[instance])

    # ---- records ----------------------------------------------------------------------------------------

    def record(self, model: str, method: str, path: str, arrived: str, served: Served, duration_s: float) -> None:
        answer = served.answer
        tokens = of_body(answer.kept, answer.streamed) if answer is not None else Tokens()
        per_s = tokens.per_s
        if per_s is None and tokens.generated and answer is not None and answer.ttfb_s is not None:
            generating_s = duration_s - answer.ttfb_s
            per_s = tokens.generated / generating_s if generating_s > 0 and answer.streamed else None
        ttfb_s = answer.ttfb_s if answer is not None else None
        self.metrics.observe(model, served.instance, served.status, duration_s, ttfb_s, tokens, per_s)
        self.records.append(
            RequestRecord(
                time=arrived,
                model=model,
                instance=served.instance,
                method=method,
                path=path,
                status=served.status,
                streamed=answer.streamed if answer is not None else False,
                ttfb_ms=None if ttfb_s is None else round(ttfb_s * 1000, 3),
                duration_ms=round(duration_s * 1000, 3),
                prompt_tokens=tokens.prompt,
                generated_tokens=tokens.generated,
                tokens_per_s=None if per_s is None or not math.isfinite(per_s) else round(per_s, 2),
            )
        )
