"""Planning off the event loop, bounded: a plan reads a file and computes in a thread, and a daemon that
took one thread per request would let a few requests for a large model starve every other plan and start.

At most `limit` plans compute at once; concurrent requests for the same plan share one computation; and
a request whose callers have all left before its turn came is dropped without starting (a thread that
began cannot be stopped, so it is never begun for nobody).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Shared(Generic[T]):
    """One computation and the callers waiting for it."""

    task: asyncio.Future[T] = field(init=False)
    waiting: int = 0
    began: bool = False


class PlanningThreads:
    def __init__(self, limit: int) -> None:
        self._turns = asyncio.Semaphore(limit)
        self._shared: dict[Hashable, _Shared[Any]] = {}

    async def run(self, work: Callable[[], T], key: Hashable | None = None) -> T:
        """``work()`` in a thread when its turn comes; callers giving the same ``key`` while one runs or
        waits share it (None: not shared)."""
        shared: _Shared[T] | None = self._shared.get(key) if key is not None else None
        if shared is None:
            shared = _Shared()
            shared.task = asyncio.ensure_future(self._compute(shared, work))
            # retrieved even when every caller left, so that nothing is logged as never retrieved
            shared.task.add_done_callback(lambda done: done.cancelled() or done.exception())
            if key is not None:
                self._shared[key] = shared
                shared.task.add_done_callback(lambda _: self._forget(key, shared))
        shared.waiting += 1
        try:
            return await asyncio.shield(shared.task)
        finally:
            shared.waiting -= 1
            if not shared.waiting and not shared.began:  # every caller left before its turn: drop it
                shared.task.cancel()
                if key is not None:
                    self._forget(key, shared)  # now: a caller coming before the task ends starts anew

    async def _compute(self, shared: _Shared[T], work: Callable[[], T]) -> T:
        async with self._turns:
            shared.began = True
            return await asyncio.to_thread(work)

    def _forget(self, key: Hashable, shared: _Shared[Any]) -> None:
        if self._shared.get(key) is shared:
            del self._shared[key]
