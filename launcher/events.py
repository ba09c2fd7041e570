"""A small publish/subscribe bus: each reader gets a bounded queue of what is published from the moment it
subscribes, and a reader that does not keep up loses items rather than holding memory or the publisher
up. The daemon's events (state changes, exits, errors) go through one, the dashboard's GPU samples through
another. Standard library only: every layer may use it."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


def _ignore(_item: object) -> None:
    pass


class Bus(Generic[T]):
    """``queue_size``: the items a reader may fall behind by. ``keep``: how many of the latest items are kept
    for `recent` (a reader that joins late reads what it missed). ``listener``: called with every item on
    the publisher's side, before the queues (the daemon's log)."""

    def __init__(self, queue_size: int, *, keep: int = 0, listener: Callable[[T], None] = _ignore) -> None:
        self._queue_size = queue_size
        self._kept: deque[T] = deque(maxlen=keep)
        self._listener = listener
        self._queues: set[asyncio.Queue[T]] = set()

    def publish(self, item: T) -> None:
        self._kept.append(item)
        self._listener(item)
        for queue in self._queues:
            with contextlib.suppress(asyncio.QueueFull):  # a reader that does not keep up loses items
                queue.put_nowait(item)

    def subscribe(self) -> asyncio.Queue[T]:
        """A queue that receives every item from now on; `unsubscribe` it when done."""
        queue: asyncio.Queue[T] = asyncio.Queue(maxsize=self._queue_size)
        self._queues.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[T]) -> None:
        self._queues.discard(queue)

    @property
    def has_readers(self) -> bool:
        """Whether anyone subscribes: a publisher may skip the work of an item nobody reads."""
        return bool(self._queues)

    def recent(self, count: int) -> list[T]:
        """The last ``count`` items kept, oldest first."""
        return list(self._kept)[-count:] if count > 0 else []
