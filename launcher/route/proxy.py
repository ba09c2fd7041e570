"""Passing one request to a server and its answer back to the client as it comes, chunk by chunk.

The upstream side is aiohttp, chosen by measurement (bench/router.py): on this path it costs a fraction of
httpx's time per request and per streamed chunk. Bodies pass through as bytes, never decoded, so a
compressed or binary answer arrives as the server sent it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import aiohttp
from starlette.types import Send

from launcher.route.naming import StreamNaming, rename_document
from launcher.route.off_loop import for_body
from launcher.route.usage import TAIL_BYTES

# Headers about one connection, not the message (RFC 9110 7.6.1), plus what aiohttp sets itself and the
# client's key for the front door, which is not the server's.
_REQUEST_DROPPED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"authorization",
        b"x-api-key",
        b"expect",  # uvicorn answered the client's 100-continue already
        # Which page sent it was decided at the door (launcher/api/origin.py): a server that sees an Origin
        # answers CORS of its own (llama-server echoes it, with credentials), and a peer would decide again.
        # The page's other fetch metadata (Sec-Fetch-*) goes with it.
        b"origin",
    }
)
_FETCH_METADATA_PREFIX = b"sec-fetch-"
_RESPONSE_DROPPED = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"trailer", b"upgrade"})
# The servers' CORS answers: the daemon answers CORS itself, for daemon.cors_origins only.
_CORS_PREFIX = b"access-control-"
_STREAM_TYPES = (b"text/event-stream", b"application/x-ndjson")
_PLAIN_KEPT_BYTES = 4 * 1024 * 1024  # a plain answer's usage is read from its whole body, up to this size
# Below llama-server's own keep-alive (cpp-httplib closes an idle connection after 5 s): a pooled connection
# the server is closing at that moment would fail a request that never reached it.
_KEEPALIVE_S = 4.0
_CONNECT_TIMEOUT_S = 10.0


def outgoing_headers(headers: list[tuple[bytes, bytes]], extra: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The client's headers as they go on to the server: less the dropped ones and what the client's
    Connection: names as its connection's own, plus ``extra`` (a peer's key)."""
    named = {t.strip().lower() for k, v in headers if k.lower() == b"connection" for t in v.split(b",")}
    dropped = _REQUEST_DROPPED | named
    return [
        (k.decode("latin-1"), v.decode("latin-1"))
        for k, v in headers
        if (name := k.lower()) not in dropped and not name.startswith(_FETCH_METADATA_PREFIX)
    ] + list(extra)


@dataclass(frozen=True)
class Answer:
    """What the server answered and how it went."""

    status: int
    streamed: bool
    ttfb_s: float | None  # from the request's arrival to the first byte of the answer's body
    kept: bytes  # a plain answer's body, or a stream's tail: what its token counts are read from


class UpstreamFailed(Exception):
    """The server could not be reached, or broke off; ``sent`` says whether the client got anything."""

    def __init__(self, reason: str, *, sent: bool, reached: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.sent = sent
        self.reached = reached  # False: no connection was made (nothing listens there, or no route)


class UpstreamClient(Protocol):
    """What the front door needs of its client to the servers: ``Upstream`` here, or the bench's httpx one."""

    async def forward(
        self,
        method: str,
        url: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        send: Send,
        arrived_s: float,
        *,
        extra: Sequence[tuple[str, str]] = (),
        naming: str | None = None,
    ) -> Answer: ...

    async def close(self) -> None: ...


class Upstream:
    """The connections to the servers behind the front door (kept alive, any number at once)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:  # made on the running loop, at first use
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=_KEEPALIVE_S),
                # A generation can take minutes before and between tokens: only the connect is bounded.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=_CONNECT_TIMEOUT_S),
                auto_decompress=False,
                skip_auto_headers=("Accept-Encoding", "User-Agent"),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def forward(
        self,
        method: str,
        url: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        send: Send,
        arrived_s: float,
        *,
        extra: Sequence[tuple[str, str]] = (),
        naming: str | None = None,
    ) -> Answer:
        """Send the request to ``url`` (with the client's headers less the dropped ones, plus ``extra``: a
        peer's key) and the answer to ``send``, its `model` fields naming ``naming`` when given. Raises
        UpstreamFailed; when it broke off in the middle of a stream of events, the client is told so in a
        last event first."""
        outgoing = outgoing_headers(headers, extra)
        try:
            response = await self._open().request(method, url, headers=outgoing, data=body, allow_redirects=False)
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamFailed(f"cannot reach it: {exc or type(exc).__name__}", sent=False, reached=False) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamFailed(f"cannot reach it: {exc or type(exc).__name__}", sent=False) from None
        try:
            return await relay(
                response.status,
                response.raw_headers,
                response.content.iter_any(),
                send,
                arrived_s,
                broke_off=(aiohttp.ClientError, OSError),
                naming=naming,
            )
        finally:
            response.close()  # a stream cut short (the client left) must not go back to the pool


async def relay(
    status: int,
    raw_headers: Sequence[tuple[bytes, bytes]],
    body: AsyncIterable[bytes],
    send: Send,
    arrived_s: float,
    *,
    broke_off: tuple[type[Exception], ...],
    naming: str | None = None,
) -> Answer:
    """Pass a server's answer (its status, headers as sent and body as it comes) on to ``send``, less the
    connection's headers and the server's CORS answers. ``broke_off``: what the HTTP client raises when the
    server breaks off (UpstreamFailed then; a stream of events is told so in a last event first).
    ``naming``: the name the answer's `model` fields get (launcher/route/naming.py)."""
    # The first Content-Type, as the rest of the daemon reads it.
    content_type = next((v for k, v in raw_headers if k.lower() == b"content-type"), b"")
    streamed = content_type.startswith(_STREAM_TYPES)
    headers = [
        (name, v)
        for k, v in raw_headers
        if (name := k.lower()) not in _RESPONSE_DROPPED and not name.startswith(_CORS_PREFIX)
    ]
    if streamed:
        headers.append((b"x-accel-buffering", b"no"))  # nginx in front must not hold events back
    encoded = any(k.lower() == b"content-encoding" for k, _ in raw_headers)
    stream_naming = StreamNaming(naming) if naming is not None and streamed and not encoded else None
    if naming is not None and not streamed and not encoded and content_type.startswith(b"application/json"):
        # Whole, to rename its `model` (its length changes with it); a body too big passes as it came.
        try:
            body, headers = await _renamed(body, headers, naming)
        except broke_off as exc:
            reason = f"broke off before its answer's end: {exc or type(exc).__name__}"
            raise UpstreamFailed(reason, sent=False) from None
    await send({"type": "http.response.start", "status": status, "headers": headers})
    kept = bytearray()
    ttfb_s: float | None = None
    try:
        async for chunk in body:
            if ttfb_s is None:
                ttfb_s = time.monotonic() - arrived_s
            if stream_naming is not None:
                chunk = stream_naming.feed(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            kept += chunk
            if streamed and len(kept) > 2 * TAIL_BYTES:
                del kept[:-TAIL_BYTES]
            elif not streamed and len(kept) > _PLAIN_KEPT_BYTES:
                kept.clear()  # too big to read usage from: pass it on, keep nothing
    except broke_off as exc:
        reason = f"broke off in the middle of its answer: {exc or type(exc).__name__}"
        if content_type.startswith(b"text/event-stream"):
            error = {"error": {"message": reason, "type": "server_error", "code": "upstream_failed"}}
            with contextlib.suppress(OSError):
                event = f"data: {json.dumps(error)}\n\n".encode()
                await send({"type": "http.response.body", "body": event, "more_body": False})
        raise UpstreamFailed(reason, sent=True) from None
    last = stream_naming.end() if stream_naming is not None else b""
    kept += last
    await send({"type": "http.response.body", "body": last, "more_body": False})
    return Answer(
        status=status,
        streamed=streamed,
        ttfb_s=ttfb_s,
        kept=bytes(kept[-TAIL_BYTES:]) if streamed else bytes(kept),
    )


async def _renamed(
    body: AsyncIterable[bytes], headers: list[tuple[bytes, bytes]], naming: str
) -> tuple[AsyncIterable[bytes], list[tuple[bytes, bytes]]]:
    """A plain JSON answer read whole (up to _PLAIN_KEPT_BYTES) with its `model` naming ``naming`` and its
    Content-Length to match; past that size, what was read and the rest, unchanged."""
    read = bytearray()
    chunks = aiter(body)
    async for chunk in chunks:
        read += chunk
        if len(read) > _PLAIN_KEPT_BYTES:
            return _chain(bytes(read), chunks), headers
    whole = bytes(read)
    renamed = await for_body(whole, functools.partial(rename_document, whole, naming))
    if renamed is not whole:
        length = str(len(renamed)).encode()
        headers = [(k, length if k == b"content-length" else v) for k, v in headers]
    return _chain(renamed, chunks), headers


async def _chain(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for chunk in rest:
        yield chunk
