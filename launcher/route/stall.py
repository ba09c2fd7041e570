"""Stuck slots: a request in flight whose server makes no progress while its `/health` still answers.

A server can take a request and never answer it (its slot hung) while its health probe passes, so the
health check never sees it. Progress is either a byte of the answer reaching the client or a change in
what the server's `GET /slots` shows of its busy slots: tokens decoded (`next_token.n_decoded`) or prompt
tokens processed (`n_prompt_tokens_processed`), so a long prompt being processed is progress. No byte and
no change for the model's `health.stall_s` is a stall: the request ends with a 504 in OpenAI's shape (a
stream already begun gets an error event, then its end), an event names the instance, slots and request,
and after `health.stall_failures` stalls the server is restarted, drained of its other requests first.

`stalled` decides, pure, from the readings taken; `StallWatch` (the front door's) takes them, only while a
request is in flight and quiet, bounded in time, and carries the verdict out. A server whose `/slots`
cannot be read (Ollama; llama-server run with `--no-slots`) is never judged stalled: nothing shows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.types import Message, Send

from launcher.config_supervision import HealthSettings
from launcher.errors import LauncherError
from launcher.events import Bus
from launcher.route.proxy import Answer
from launcher.schema_instances import Event

# A busy slot's progress: its id -> (prompt tokens processed, tokens decoded, the server's task id).
Slots = Mapping[int, tuple[int, int, int | None]]


@dataclass(frozen=True)
class Reading:
    """What `/slots` showed at ``at_s`` (monotonic): the busy slots, or None when it could not be read."""

    at_s: float
    slots: Slots | None


def stalled(readings: Sequence[Reading], last_progress_s: float, now_s: float, stall_s: float) -> Slots | None:
    """The busy slots of a stall (possibly none busy), or None when it is not one.

    ``readings``: in the order taken; ``last_progress_s``: the request's arrival or its answer's last byte.
    A stall: stall_s > 0, nothing reached the client for stall_s, and the readings from the last one taken
    at least stall_s ago (after the last byte) to now all read and all show the same busy slots, with the
    same counts. One unreadable reading, or none old enough, leaves it undecided: not a stall."""
    if stall_s <= 0 or now_s - last_progress_s < stall_s:
        return None
    window_start_s = now_s - stall_s
    base = next(
        (i for i in range(len(readings) - 1, -1, -1) if last_progress_s <= readings[i].at_s <= window_start_s), None
    )
    if base is None:
        return None
    since = readings[base:]
    first = since[0].slots
    if first is None or any(r.slots != first for r in since):
        return None
    return first


def busy_slots(document: object) -> Slots | None:
    """The busy slots in llama-server's `GET /slots` answer, or None when it is not one."""
    if not isinstance(document, list):
        return None
    busy: dict[int, tuple[int, int, int | None]] = {}
    for slot in document:
        if not isinstance(slot, dict) or not isinstance(slot.get("id"), int):
            return None
        if not slot.get("is_processing"):
            continue
        # `next_token` is one object, or one per sequence in newer servers.
        tokens = slot.get("next_token")
        tokens = tokens if isinstance(tokens, list) else [tokens]
        # Each count that is not a whole number reads as 0 (a None summed raised, and the watch of every
        # request on the server stopped with its timer's task).
        decoded = sum(n for t in tokens if isinstance(t, dict) and isinstance(n := t.get("n_decoded", 0), int))
        processed = slot.get("n_prompt_tokens_processed", 0)
        task = slot.get("id_task")
        busy[slot["id"]] = (
            processed if isinstance(processed, int) else 0,
            decoded,
            task if isinstance(task, int) else None,
        )
    return busy


def describe(slots: Slots) -> str:
    if not slots:
        return "no slot busy"
    return ", ".join(
        f"slot {slot}"
        + (f" (task {task})" if task is not None else "")
        + f": {processed} prompt tokens, {decoded} decoded"
        for slot, (processed, decoded, task) in sorted(slots.items())
    )


class Stalled(Exception):
    """The request stalled and was ended; ``sent``: the client had its answer begun (and has its end now)."""

    def __init__(self, reason: str, *, sent: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.sent = sent


@dataclass
class _Progress:
    """One request's progress, as its answer passes to the client."""

    last_s: float
    started: bool = False
    event_stream: bool = False
    sending: bool = False  # a message on its way to the client
    readings: list[Reading] = field(default_factory=list)


class StallWatch:
    """Watches the front door's requests for stalls and acts on them. ``http``: for `/slots`; ``events``:
    where stalls are told; ``restart``: replaces an instance (drained first); ``spawn``: runs that on."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        events: Bus[Event],
        restart: Callable[[str], Awaitable[object]],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self._http = http
        self._events = events
        self._restart = restart
        self._spawn = spawn
        self._stalls: dict[str, int] = {}  # instance -> stalls since it was last ready
        self._latest: dict[str, Reading] = {}  # instance -> its last `/slots` reading

    async def guard(
        self,
        instance: str,
        port: int,
        health: HealthSettings,
        what: str,
        forward: Callable[[Send], Awaitable[Answer]],
        send: Send,
    ) -> Answer:
        """Run ``forward`` (the request passed to the server, its answer to the send it is given) watching
        for a stall by ``health`` (read at each request: a reload's values hold from the next); ``what``
        names the request. Raises Stalled once it has ended a stalled one."""
        stall_s, timeout_s = health.stall_s, health.timeout
        if stall_s <= 0:
            return await forward(send)
        progress = _Progress(last_s=time.monotonic())

        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                progress.started = True
                progress.event_stream = any(
                    k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in message["headers"]
                )
                await send(message)
                return
            # A send that waits is the client's pace (its socket full), not the server's: not judged meanwhile,
            # and its bytes count when they are taken. Else a slow client had a healthy server cut and replaced.
            progress.sending = True
            try:
                await send(message)
            finally:
                progress.sending = False
                if message.get("body"):
                    progress.last_s = time.monotonic()

        # The request runs in this task and a timer checks on it every quarter of stall_s: a request that
        # ends before the first check costs one timer (a task per request and asyncio.wait cost ~12x more).
        loop = asyncio.get_running_loop()
        current = asyncio.current_task()
        assert current is not None
        interval_s = stall_s / 4
        found: Slots | None = None
        check: asyncio.Task[None] | None = None
        timer: asyncio.TimerHandle | None = None

        async def read() -> None:
            nonlocal found, timer
            if not progress.sending and time.monotonic() - progress.last_s >= interval_s:  # else bytes flow
                reading = await self._read(instance, port, timeout_s, interval_s / 2)
                # A reading from before the last byte never counts; enough are kept to span stall_s.
                progress.readings = [r for r in progress.readings if r.at_s >= progress.last_s][-8:]
                progress.readings.append(reading)
                found = stalled(progress.readings, progress.last_s, time.monotonic(), stall_s)
                if found is not None:
                    current.cancel()  # ends the request where it waits on the server
                    return
            timer = loop.call_later(interval_s, tick)

        def tick() -> None:
            nonlocal check
            check = loop.create_task(read())

        timer = loop.call_later(interval_s, tick)
        try:
            return await forward(watched)
        except asyncio.CancelledError:
            if found is None:
                raise  # not the stall's: the client left, or the daemon stops
            current.uncancel()
        finally:
            if timer is not None:
                timer.cancel()
            if check is not None and not check.done():
                check.cancel()
        reason = f"no progress for {stall_s:g}s on {instance} ({describe(found)}) while it answers its health check"
        await self._end(progress, send, reason)
        self._tell(instance, f"{what}: {reason}", health.stall_failures)
        raise Stalled(reason, sent=progress.started)

    async def _read(self, instance: str, port: int, timeout_s: float, max_age_s: float) -> Reading:
        """The instance's `/slots` now, or as read for another of its requests within ``max_age_s``: one
        reading serves all of its quiet requests."""
        latest = self._latest.get(instance)
        if latest is not None and time.monotonic() - latest.at_s < max_age_s:
            return latest
        try:
            response = await self._http.get(f"http://127.0.0.1:{port}/slots", timeout=timeout_s)
            slots = busy_slots(response.json()) if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            slots = None
        self._latest[instance] = reading = Reading(time.monotonic(), slots)
        return reading

    @staticmethod
    async def _end(progress: _Progress, send: Send, reason: str) -> None:
        """A stream already begun is told in a last event and ended; a plain answer begun is cut."""
        if not progress.started:
            return  # the front door answers the 504 itself
        error = {"error": {"message": reason, "type": "server_error", "param": None, "code": "stall"}}
        last = f"data: {json.dumps(error)}\n\n".encode() if progress.event_stream else b""
        with contextlib.suppress(OSError):
            await send({"type": "http.response.body", "body": last, "more_body": False})

    def forget(self, instance: str) -> None:
        """``instance`` is ready (a new server, or one whose health checks pass again): its stalls start over."""
        self._stalls.pop(instance, None)
        self._latest.pop(instance, None)

    def _tell(self, instance: str, message: str, stall_failures: int) -> None:
        count = self._stalls.get(instance, 0) + 1
        self._stalls[instance] = count
        self._events.publish(Event.now("stall", f"{message} (stall {count}/{stall_failures})", instance=instance))
        if count < stall_failures:
            return
        self._stalls[instance] = 0
        why = f"replacing it after {count} stalls"
        self._events.publish(Event.now("stall", why, instance=instance))

        async def replace() -> None:
            try:
                await self._restart(instance)
            except LauncherError as exc:  # removed or stopped meanwhile: nothing left to replace
                self._events.publish(Event.now("warning", f"not replaced after its stalls: {exc}", instance=instance))

        self._spawn(replace())
