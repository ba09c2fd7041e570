"""Admission to the instances: requests in flight per instance and the bounded queue per model, who is
served now, who waits, in the order they came. Which replica is chosen is `choose.pick`'s decision; this
object keeps the counts, in the instance table's `RequestLoad` where the statuses read them."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Collection, Iterable, Sequence
from fractions import Fraction

from launcher.route.choose import Replica, pick
from launcher.route.errors import RouteError
from launcher.route.prefix_ring import RECENT_REQUESTS
from launcher.supervise.table import RequestLoad


class Admission:
    def __init__(
        self,
        replicas: Callable[[str], Sequence[Replica]],
        load: RequestLoad,
        prefix_epsilon: Callable[[str], float | None] = lambda _model: None,
    ) -> None:
        self._replicas = replicas  # a model's instances as they are now
        self._prefix_epsilon = prefix_epsilon  # a model's routing_epsilon when it routes by prefix, else None
        self._load = load  # instance -> requests it serves now
        self._queued = load.queued  # model -> requests waiting (len of its _waiting, for the statuses)
        # model -> requests waiting, oldest first, each with its prefix key and its place in the arrivals
        self._waiting: dict[str, deque[tuple[asyncio.Future[str], str | None, int]]] = {}
        self._arrivals = itertools.count()  # the place of each request that waits, in all models' order
        # model held to no new request -> the place of the first that came after (see hold)
        self._held: dict[str, int] = {}
        self._turn: dict[str, int] = {}  # model -> round-robin position among equals
        # model -> its last RECENT_REQUESTS: the instance each went to, and the instances serving then
        self._given: dict[str, deque[tuple[str, tuple[str, ...]]]] = {}

    def in_flight(self, instance: str) -> int:
        return self._load.on(instance)

    def queued(self, model: str) -> int:
        return len(self._waiting.get(model, ()))

    def _counted(self, model: str) -> None:
        """Copy ``model``'s queue length where the statuses read it."""
        self._queued[model] = self.queued(model)

    def busy(self, model: str, instances: Sequence[str]) -> bool:
        """A request of ``model`` is in flight on one of its ``instances`` or waits for one it is to be
        given while it runs (not one that came while it was held: that one waits for its next start)."""
        waiting = self._waiting.get(model)
        boundary = self._held.get(model)
        waits = waiting is not None and bool(waiting) and (boundary is None or waiting[0][2] < boundary)
        return waits or any(self.in_flight(i) for i in instances)

    def hold(self, models: Collection[str]) -> None:
        """Give ``models`` no request that comes from now on, so that they go idle (a model that waited too
        long for room needs them stopped): those waiting already are still served. Models held before and
        not in ``models`` take requests again."""
        for model in [m for m in self._held if m not in models]:
            del self._held[model]
            self.dispatch(model)
        for model in models:
            self._held.setdefault(model, next(self._arrivals))

    def held(self, model: str) -> bool:
        return model in self._held

    def _take(self, model: str, prefix: str | None, *, unbounded: bool = False) -> str | None:
        turn = self._turn.get(model, 0)
        replicas = self._replicas(model)
        given = self._given.setdefault(model, deque(maxlen=RECENT_REQUESTS))
        recent, shares = recent_counts(given)
        replicas = [dataclasses.replace(r, recent=recent[r.name], recent_share=shares[r.name]) for r in replicas]
        if unbounded:
            replicas = [dataclasses.replace(r, limit=r.in_flight + 1) for r in replicas]
        epsilon = self._prefix_epsilon(model)
        name = pick(replicas, turn) if epsilon is None or prefix is None else pick(replicas, turn, prefix, epsilon)
        if name is not None:
            self._turn[model] = turn + 1
            # A look at a server (a pass-through without a prompt: a GET of its /metrics or /slots) is no work
            # for it: not counted against its share. A pass-through chat (Ollama's /api/chat) is.
            if prefix is not None or not unbounded:
                given.append((name, tuple(r.name for r in replicas if r.serving)))
            self._load.take(name)
        return name

    def try_take(self, model: str, prefix: str | None = None, *, unbounded: bool = False) -> str | None:
        """An instance that takes the request now (counted in flight), if none waits before it; ``prefix``:
        the request's prefix key (`prefix_ring.prefix_key`). ``unbounded``: past the instances' limits and
        the queue (a pass-through to the server)."""
        if unbounded:
            return self._take(model, prefix, unbounded=True)
        return None if self.queued(model) or model in self._held else self._take(model, prefix)

    async def wait(self, model: str, queue_max: int, timeout_s: float, prefix: str | None = None) -> str:
        """Wait in ``model``'s queue for an instance (counted in flight once given). RouteError 429 when
        the queue is full or the wait runs out; whatever `fail` sets is raised here."""
        waiting = self._waiting.setdefault(model, deque())
        if len(waiting) >= queue_max:
            raise RouteError(429, f"{model}: {len(waiting)} requests are queued already", "queue_full", retry_after_s=1)
        turn: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        entry = (turn, prefix, next(self._arrivals))
        waiting.append(entry)
        self._counted(model)
        given: str | None = None
        try:
            async with asyncio.timeout(timeout_s):
                given = await turn
        except TimeoutError:
            raise RouteError(
                429,
                f"{model}: no instance free within queue_timeout_s ({timeout_s:g}s)",
                "queue_timeout",
                retry_after_s=1,
            ) from None
        finally:
            if entry in waiting:
                waiting.remove(entry)
                self._counted(model)
            if given is None and turn.done() and not turn.cancelled() and turn.exception() is None:
                self.release(turn.result())  # given an instance just as the wait ended: give it back
        return given

    def release(self, instance: str) -> None:
        self._load.release(instance)

    def dispatch(self, model: str) -> None:
        """Give free instances to the waiting requests, oldest first (while ``model`` is held, only to those
        that came before)."""
        waiting = self._waiting.get(model)
        boundary = self._held.get(model)
        while waiting and (boundary is None or waiting[0][2] < boundary):
            turn = waiting[0][0]
            if not turn.done():  # else its wait ended meanwhile (cancelled, timed out): given nothing
                name = self._take(model, waiting[0][1])
                if name is None:
                    return
                turn.set_result(name)
            waiting.popleft()
            self._counted(model)

    def forget(self, model: str, error: RouteError) -> None:
        """``model`` is gone (a reload removed it): its waits end with ``error`` and nothing of it is kept,
        so a model added back under its name starts afresh (its servers are new, their caches empty)."""
        self.fail(model, error)
        self._queued.pop(model, None)
        self._given.pop(model, None)
        self._turn.pop(model, None)
        self._held.pop(model, None)

    def fail(self, model: str, error: RouteError) -> None:
        """End every wait for ``model`` with ``error`` (it stopped, failed or cannot start)."""
        waiting = self._waiting.pop(model, deque())
        self._counted(model)
        for turn, _, _ in waiting:
            if not turn.done():
                turn.set_exception(error)
        waiting.clear()  # none waits now: their waits' ends count nothing again (a forgotten model's included)


def recent_counts(given: Iterable[tuple[str, tuple[str, ...]]]) -> tuple[Counter[str], defaultdict[str, Fraction]]:
    """Per instance, the requests it was given among ``given`` (each: the instance, those serving then) and
    its share of them, 1/n of each one made while it served: a replica that joined (or came back) part-way
    is held to the requests since, not drawn to the mean of the whole window."""
    shares: defaultdict[str, Fraction] = defaultdict(Fraction)
    for serving, count in Counter(present for _, present in given).items():
        for name in serving:
            shares[name] += Fraction(count, len(serving))
    return Counter(name for name, _ in given), shares
