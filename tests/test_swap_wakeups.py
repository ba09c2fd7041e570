"""The front door's swaps, with the manager and the servers faked: a request waiting for room is woken by
the model in its way going idle, even when that happens while its own decision is being planned."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
from starlette.types import Message, Send

from launcher.config import Settings
from launcher.config_model import ModelSettings
from launcher.events import Bus
from launcher.route.proxy import Answer
from launcher.route.router import Router
from launcher.schema_instances import Event, State
from launcher.supervise.table import InstanceTable


@dataclass
class _Instance:
    name: str
    state: State
    active: bool
    port: int = 1
    restarting: bool = False
    downloading: bool = False
    download: None = None
    settings: ModelSettings = field(default_factory=lambda: ModelSettings(model=Path("/m.gguf")))


@dataclass(frozen=True)
class _Plan:
    fits: bool
    reason: str | None = None


class _Manager:
    """Room for `a` only once `b` is stopped; its planning hands over to ``meanwhile`` after deciding."""

    def __init__(self, table: InstanceTable, events: Bus[Event], meanwhile: Callable[[], Any]) -> None:
        self._table = table
        self._events = events
        self._meanwhile = meanwhile
        self.started: list[str] = []

    def _set(self, name: str, state: State) -> None:
        instance = cast(_Instance, self._table.instances[name])
        instance.state, instance.active = state, state == State.READY
        self._events.publish(Event.now("state", state.value, instance=name, state=state))

    async def await_vacated(self, model: str) -> None:
        return None

    def planner_with_stopped(self, instance: str) -> Callable[[Sequence[str]], _Plan]:
        in_the_way = {"a": "b", "b": "a", "c": "d"}[instance]  # a fits once b is stopped (and b once a is)...
        return lambda stopped: _Plan(in_the_way in stopped)

    async def in_planning_thread(self, decide: Callable[[], Any]) -> Any:
        decided = decide()
        await self._meanwhile()  # what happens while the planner's thread runs
        return decided

    async def stop(self, name: str) -> None:
        self._set(name, State.STOPPED)

    async def start(self, name: str) -> None:
        self.started.append(name)
        self._set(name, State.READY)

    async def restart(self, name: str) -> None:
        raise AssertionError("no restart here")


class _Upstream:
    """Answers at once, but a request to a port of ``held`` only once its event is set."""

    def __init__(self, *held: int) -> None:
        self.held = {port: asyncio.Event() for port in held}
        self.forwarded: list[int] = []  # the port of each request passed on, in order
        self._forwarding = asyncio.Event()

    async def reached(self, count: int) -> None:
        """Return once ``count`` requests were passed on."""
        while len(self.forwarded) < count:
            self._forwarding.clear()
            await self._forwarding.wait()

    async def forward(self, method: str, url: str, headers: Any, body: bytes, send: Send, *_: Any, **__: Any) -> Answer:
        port = int(url.split(":")[2].split("/")[0])
        self.forwarded.append(port)
        self._forwarding.set()
        if port in self.held:
            await self.held[port].wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})
        return Answer(status=200, streamed=False, ttfb_s=0.0, kept=b"{}")

    async def close(self) -> None:
        return None


async def _ignore(_: Message) -> None:
    return None


@dataclass
class _FrontDoor:
    router: Router
    manager: _Manager
    upstream: _Upstream
    events: Bus[Event]

    def request(self, model: str) -> asyncio.Task[Any]:
        arrived_s = asyncio.get_running_loop().time()
        return asyncio.create_task(self.router.serve(model, "POST", "/v1/x", [], b"{}", _ignore, arrived_s))


@asynccontextmanager
async def _front_door(
    models: str, running: str, meanwhile: Callable[[], Any], **settings: Any
) -> AsyncIterator[_FrontDoor]:
    """On-demand ``models`` (instance n's port n + 1, with ``settings``), ``running`` ones ready, their
    requests held."""
    config = {m: {"model": f"/{m}.gguf", "on_demand": True, "queue_timeout_s": 5, **settings} for m in models}
    table = InstanceTable()
    ports = {m: n + 1 for n, m in enumerate(models)}
    instances = {
        m: _Instance(m, State.READY if m in running else State.STOPPED, m in running, ports[m]) for m in models
    }
    table.instances = cast(Any, instances)
    table.groups = {m: [m] for m in models}
    upstream = _Upstream(*(ports[m] for m in running))
    events = Bus[Event](100, keep=100)
    manager = _Manager(table, events, meanwhile)
    async with httpx.AsyncClient() as http:
        router = Router(
            Settings.model_validate({"models": config}), manager=cast(Any, manager), table=table, events=events,
            peers=None, http=http, upstream=cast(Any, upstream),
        )  # fmt: skip
        async with router:
            yield _FrontDoor(router, manager, upstream, events)


async def test_a_model_going_idle_while_a_waiting_ones_room_is_planned_still_wakes_it() -> None:
    b_request: asyncio.Task[Any] | None = None

    async def b_ends() -> None:  # b's one request ends after a's decision (b busy: wait) and before a waits
        if b_request is not None and not b_request.done():
            door.upstream.held[2].set()
            await b_request

    async with _front_door("ab", "b", b_ends) as door:
        b_request = door.request("b")
        await asyncio.wait_for(door.upstream.reached(1), 2)  # b's request is in flight
        served = await asyncio.wait_for(door.request("a"), 4)
    assert served.status == 200 and served.instance == "a" and door.manager.started == ["a"]


async def test_a_waiting_model_that_could_start_is_not_held_behind_an_older_one_that_cannot() -> None:
    """a waits for busy b, then c for busy d; d goes idle while b stays busy: c starts (a still waits)."""

    async def nothing() -> None:
        return None

    async with _front_door("abcd", "bd", nothing) as door:
        told = door.events.subscribe()

        async def waits(model: str) -> None:
            while f"{model} waits for room" not in (await told.get()).message:
                pass

        held = [door.request("b"), door.request("d")]
        await asyncio.wait_for(door.upstream.reached(2), 2)  # b's and d's requests are in flight
        waiting_a = door.request("a")
        await asyncio.wait_for(waits("a"), 2)
        waiting_c = door.request("c")
        await asyncio.wait_for(waits("c"), 2)
        door.upstream.held[4].set()  # d goes idle; b stays busy
        served = await asyncio.wait_for(waiting_c, 4)
        assert served.instance == "c" and door.manager.started == ["c"] and not waiting_a.done()
        door.upstream.held[2].set()
        assert (await asyncio.wait_for(waiting_a, 4)).instance == "a"
        await asyncio.gather(*held)


async def test_a_model_in_steady_use_is_held_to_no_new_request_once_a_waiting_one_waited_too_long() -> None:
    """b takes request after request while a waits for room: until half a's queue_timeout_s b serves them as
    they come (collated, no swap); from then on b takes no new one, goes idle, and a starts. The request for
    b that came after is served after a's, by b started again (without the hold a's requests would wait
    until they timed out, b never idle)."""

    async def nothing() -> None:
        return None

    async with _front_door("ab", "b", nothing, queue_timeout_s=0.4, max_concurrency=4) as door:
        told = door.events.subscribe()

        async def told_of(text: str) -> None:
            while text not in (await told.get()).message:
                pass

        b_before = [door.request("b")]
        await asyncio.wait_for(door.upstream.reached(1), 2)
        for_a = door.request("a")
        await asyncio.wait_for(told_of("a waits for room: b is busy"), 2)
        b_before.append(door.request("b"))  # before a's wait is too long: b serves it now
        await asyncio.wait_for(door.upstream.reached(2), 2)
        await asyncio.wait_for(told_of("b takes no new request until it is idle: a waited"), 2)
        b_after = door.request("b")
        door.upstream.held[2].set()  # b's requests end; b, held, goes idle
        assert (await asyncio.wait_for(for_a, 4)).instance == "a"
        assert (await asyncio.wait_for(b_after, 4)).instance == "b"
        assert [(await request).status for request in b_before] == [200, 200]
    assert door.upstream.forwarded == [2, 2, 1, 2] and door.manager.started == ["a", "b"]
