"""Work on a large body off the event loop: tens of MiB of JSON take a second or more to parse and tenths
of one to write, and a 4 MiB answer of embeddings a third of one to parse; on the event loop that would
hold every other request and stream of the daemon up meanwhile. A small body's work runs at once: a chat's
usual body parses in microseconds, where a thread's hand-off would cost more than the work."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
ON_LOOP_MAX_BYTES = 64 * 1024  # work on a body larger than this runs in a thread


async def for_body(body: bytes, work: Callable[[], T]) -> T:
    """``work`` on ``body`` (its parse, its rewrite), in a thread when the body is large."""
    if len(body) <= ON_LOOP_MAX_BYTES:
        return work()
    return await asyncio.to_thread(work)
