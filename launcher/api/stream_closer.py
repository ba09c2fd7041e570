"""Ending the API's open streams cleanly when the daemon's API ends (a stop, an upgrade).

A followed `/events`, `/gpus/stream` or `logs?follow=true` answer never ends by itself: uvicorn's graceful
shutdown would wait for it until its timeout, then cut it mid-body (a client reads a broken chunked answer),
and an upgrade that cut every answer to avoid the wait also cut ordinary answers under way. `StreamCloser`
sits before the REST API: once `close` is called, every answer that is being streamed (it started without a
Content-Length) gets the end of its chunked body, a clean end its client reads as the stream's last, and
its producer is cancelled (its `finally` unsubscribes). Ordinary answers are left to finish: uvicorn's
graceful shutdown waits for them, bounded by its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_END: Message = {"type": "http.response.body", "body": b"", "more_body": False}


class StreamCloser:
    """An ASGI middleware over ``app`` that ends its streamed answers once `close` is called."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app
        self._closing = asyncio.Event()

    def close(self) -> None:
        """End every streamed answer now (and each one that starts later) with the end of its body."""
        self._closing.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        streaming = asyncio.Event()  # the answer started without a length: a stream, maybe an endless one
        ended = False  # the end was sent here: what the app still writes goes nowhere

        async def watched(message: Message) -> None:
            if ended:
                return
            if message["type"] == "http.response.start" and not _has_length(message):
                streaming.set()
            await send(message)

        answering = asyncio.ensure_future(self._app(scope, receive, watched))
        try:
            await _first(answering, self._closing.wait())
            if not answering.done():  # closing: an ordinary answer finishes, a stream ends here
                await _first(answering, streaming.wait())
            if not answering.done():
                ended = True
                answering.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await answering
                await send(_END)
                return
            answering.result()  # the app's own error, as without this middleware
        finally:
            answering.cancel()


def _has_length(start: Message) -> bool:
    headers: list[tuple[bytes, bytes]] = start.get("headers", [])
    return any(name.lower() == b"content-length" for name, _value in headers)


async def _first(task: asyncio.Future[None], waiting: Any) -> None:
    """Wait until ``task`` is done or the coroutine ``waiting`` returns; the other is left as it is."""
    other = asyncio.ensure_future(waiting)
    try:
        await asyncio.wait({task, other}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        other.cancel()
