"""The front door's owner: which instance serves a request (or why none can), taking a replica that failed
out until it answers again (route/taken_out.py), and the record of what was served (route/request_log.py).
Starting on-demand models, making room for them and the idle timer are route/on_demand.py's, an object
this one builds.

Decisions are launcher/route/choose.py's pure functions; the counts and the queue are route/admission.py's;
this object gathers the facts (the instances read through the instance table, the events from the bus)
and carries out the acts through the manager, the only way to a process.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any

import httpx
from starlette.types import Send

from launcher.config import Settings
from launcher.events import Bus
from launcher.route import choose
from launcher.route.admission import Admission
from launcher.route.errors import RouteError
from launcher.route.on_demand import OnDemand
from launcher.route.peer import PeerForwarder
from launcher.route.proxy import UpstreamClient, UpstreamFailed
from launcher.route.request_log import RequestLog
from launcher.route.routed import NO_ROOM_RETRY_S, RoutedModel, active, downloading
from launcher.route.served import Served
from launcher.route.stall import Stalled, StallWatch
from launcher.route.taken_out import TakenOut
from launcher.route.where import Local, OnPeer, where
from launcher.rpc.peers import Peers
from launcher.schema_instances import Event, State
from launcher.supervise.manager import Manager
from launcher.supervise.table import InstanceTable

_SERVING = (State.READY,)
_CLOSED_RETRY_S = 5  # Retry-After while the daemon stops: a service manager may start it again by then


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
        self._manager = manager
        self._table = table
        self._instances = table.view
        self._events = events
        self._http = http
        self._upstream = upstream
        # What serves a model; an rpc-server lends GPUs, and is neither listed nor routed to.
        self.configured = {name: m for name, m in settings.models.items() if m.backend != "rpc-server"}
        self._models = {
            name: RoutedModel(model, list(table.groups.get(name, ()))) for name, model in self.configured.items()
        }
        self.names = {alias: name for name, m in self.configured.items() for alias in (name, *m.aliases)}
        self._group = {i: name for name, routed in self._models.items() for i in routed.instances}
        self.admission = Admission(self._replicas, table.requests, self._prefix_epsilon)
        self._slots: dict[str, int] = {}  # instance -> requests its server takes at once, read when ready
        self._taken_out = TakenOut(table.view, http, manager=manager, back=self._back_in)
        self._tasks: set[asyncio.Task[None]] = set()
        self.request_log = RequestLog(self._load)
        self.to_peers = PeerForwarder(peers, upstream)  # the peers' models, through the same connections
        self._closed: RouteError | None = None  # the answer to every request once the daemon stops
        self._stalls = StallWatch(http, events, manager.restart, self._spawn)
        self._on_demand = OnDemand(
            settings,
            models=self._models,
            admission=self.admission,
            instances=self._instances,
            events=events,
            manager=manager,
            serving=self._serving,
            spawn=self._spawn,
        )

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
        self._on_demand.reconfigure(settings)
        self.configured = {name: m for name, m in settings.models.items() if m.backend != "rpc-server"}
        models: dict[str, RoutedModel] = {}
        for name, model in self.configured.items():
            routed = self._models.get(name) or RoutedModel(model, [])
            routed.settings, routed.instances = model, list(self._table.groups.get(name, ()))
            models[name] = routed
        for name, routed in self._models.items():
            if name in models:
                continue
            if routed.bringing_up is not None:
                routed.bringing_up.cancel()
            # Its queued requests hear it now, not at their queue's timeout as a 429.
            removed = RouteError(404, f"{name} was removed from the configuration", "model_not_found")
            self.admission.forget(name, removed)
        # In place: the on-demand loader reads the same record.
        self._models.clear()
        self._models.update(models)
        self.names = {alias: name for name, m in self.configured.items() for alias in (name, *m.aliases)}
        self._group = {i: name for name, routed in self._models.items() for i in routed.instances}
        self._taken_out.keep_only(self._group)
        self._on_demand.hold_in_the_way()  # a removed model that waited for room holds nothing now
        for instance in [i for i in self._slots if i not in self._group]:
            del self._slots[instance]

    # ---- life -------------------------------------------------------------------------------------------

    async def __aenter__(self) -> Router:
        self._spawn(self._follow_events())
        self._spawn(self._on_demand.idle_timer())
        return self

    async def __aexit__(self, *_exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        probes = self._taken_out.cancel()
        for routed in self._models.values():
            if routed.bringing_up is not None:
                routed.bringing_up.cancel()
        await asyncio.gather(*self._tasks, *probes, return_exceptions=True)
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
        answer back; one retry on another replica when the first could not be reached or broke off before the
        client got anything (a replica that dies fails none of its requests that had no answer yet; the
        request may then be computed twice, and a request that kills servers kills two at most). ``queued=False``:
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
                self._taken_out.take_out(instance, exc.reason)
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
                self._on_demand.wake_idle_timer()
                if not self.admission.busy(model, routed.instances):
                    self._on_demand.next_swap()
            return Served(status=answer.status, instance=instance, answer=answer)
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _other_serving(self, routed: RoutedModel, failed: str) -> bool:
        return any(self._serving(i) for i in routed.instances if i != failed)

    def _serving(self, instance: str) -> bool:
        it = self._instances.get(instance)  # None: removed by a reload while a request on it was under way
        return (
            it is not None
            and self._closed is None
            and it.state in _SERVING
            and instance not in self._taken_out
            and not self._on_demand.stopping(self._group.get(instance))
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

    def _prefix_epsilon(self, model: str) -> float | None:
        routed = self._models.get(model)
        if routed is None or routed.settings.routing != "prefix":
            return None
        return routed.settings.routing_epsilon

    async def _lease(self, model: str, routed: RoutedModel, queued: bool, prefix: str | None) -> str:
        """An instance that takes the request, counted in flight: now, or after a wait in the queue."""
        if self._closed is not None:
            raise self._closed
        taken = self.admission.try_take(model, prefix, unbounded=not queued)
        if taken is not None:
            return taken
        # Held for a model waiting for room (on_demand.py), its requests wait for that model's swap and its own.
        loading = not any(self._serving(i) for i in routed.instances) or self.admission.held(model)
        loading_files = downloading(model, routed, self._instances)
        if loading_files is not None:
            raise loading_files
        states = [self._instances[i].state for i in routed.instances]
        if all(state == State.DEGRADED for state in states):  # waits for a peer: no point queueing behind it
            raise self._gone(model)
        if not active(routed, self._instances):
            if not routed.settings.on_demand:
                raise RouteError(
                    503, f"{model} is not running ({self.state_of(model).value}); `launcher up {model}` starts it",
                    "model_not_running", retry_after_s=NO_ROOM_RETRY_S,
                )  # fmt: skip
            self._on_demand.bring_up(model, routed)
        # Waiting for a load may take as long as the load may; a queue behind busy replicas, queue_timeout_s.
        timeout_s = routed.settings.queue_timeout_s + (routed.settings.health.load_timeout if loading else 0.0)
        try:
            return await self.admission.wait(model, routed.settings.queue_max, timeout_s, prefix)
        except BaseException:
            if routed.awaiting_room_s is not None and not self.admission.queued(model):
                self._on_demand.next_swap()  # its last request gave up: what its wait held takes requests again
            raise

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
                    self._taken_out.put_back(event.instance or "")
                    self._spawn(self._read_slots(model, event.instance or ""))
                    self._stalls.forget(event.instance or "")
                if not active(routed, self._instances) and self.admission.queued(model):
                    if not routed.settings.on_demand:
                        self.admission.fail(model, self._gone(model))
                    elif routed.awaiting_room_s is None:  # stopped (idle, evicted) while requests came: again
                        self._on_demand.bring_up(model, routed)
                self._on_demand.next_swap()  # what it held (a stop) or waited for (a start) may free a waiting model
                self.admission.dispatch(model)
                self._on_demand.wake_idle_timer()
        finally:
            self._events.unsubscribe(queue)

    def _gone(self, model: str) -> RouteError:
        state = self.state_of(model)
        instances = [self._instances[i] for i in self._models[model].instances]
        why = next((e for i in instances for e in (i.degraded_reason, i.last_error) if e), None)
        text = f"{model} is {state.value}" + (f": {why}" if why else "")
        return RouteError(503, text, "model_not_running", retry_after_s=NO_ROOM_RETRY_S)

    def _back_in(self, instance: str) -> None:
        """A replica taken out answers again (its probe put it back): its model's queue moves."""
        self.admission.dispatch(self._group[instance])

    async def _read_slots(self, model: str, instance: str) -> None:
        """Ask a server that just became ready how many requests it takes at once (one until it says)."""
        it = self._instances[instance]
        if it.port is not None:
            self._slots[instance] = await it.backend.slots(self._http, it.port, it.settings.health.timeout)
            self.admission.dispatch(model)
