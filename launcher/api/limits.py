"""HTTP limits that hold before any authentication: what a stranger on the port can make the daemon hold.

Two layers, each where the thing it bounds is seen:
- `limited_protocol`: uvicorn's httptools protocol with a bound on a request's head (request line and
  headers: httptools itself keeps an unfinished header of any size) and a deadline on reading each head
  and each body; a request past either is answered 431 or 408 and its connection closed.
- `BodyLimits`: the ASGI layer in front of everything that reads every request body whole before the
  request is dispatched (an act never runs on its headers alone), under a cap per request and a budget
  for the bodies the whole daemon holds at once (beyond it: 503 with Retry-After); and bounds the depth
  of JSON the API will parse (with the front door's parser, `parse_json_body` in launcher/route/front.py,
  which bounds the front door's own).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from collections.abc import MutableMapping
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from launcher.api.refusals import error_answer
from launcher.route.errors import on_front_door
from launcher.route.front import JSON_MAX_DEPTH, JsonTooDeep, media_type, parse_json_body

# A request line and its headers: real clients send a few KiB (browsers' cookies included).
HEAD_MAX_BYTES = 64 * 2**10
# One body: read whole (the front door needs its `model`), and it waits in the queue; well above any prompt.
BODY_MAX_BYTES = 64 * 2**20
# One body for the REST API: its only body is a peer's claim, a few hundred bytes. FastAPI parses a route's
# body on the event loop before the route's token check, so a stranger's body must stay quick to parse.
API_BODY_MAX_BYTES = 2**20
_RETRY_AFTER_S = 2
# glibc keeps freed memory for reuse; big bodies freed are handed back to the system once none is held.
_TRIM_AFTER_BYTES = 16 * 2**20
_JSON_TYPES = (b"application/json", b"")


def limited_protocol(request_timeout_s: float) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with the head bound to `HEAD_MAX_BYTES`, and each head and each body
    to be read within ``request_timeout_s`` of its start (a connection that sends nothing included)."""

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(
            self,
            config: Config,
            server_state: ServerState,
            app_state: dict[str, Any],
            _loop: asyncio.AbstractEventLoop | None = None,
        ) -> None:
            super().__init__(config, server_state, app_state, _loop)
            self.url = b""  # the request target so far (uvicorn sets it once a request begins)
            self._head_b = 0  # bytes of the current head fed to the parser
            self._in_body = False  # between a head's end and its message's end
            self._deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            # Bytes between requests (the blank lines HTTP lets a client send there, which start no message
            # and stop uvicorn's keep-alive timer) start the next head's deadline: a client cannot hold the
            # connection by dribbling them.
            if self._deadline is None and not self._in_body:
                self._arm()
            # A body goes to the parser as it comes (uvicorn's flow control bounds it); a head only up to
            # what is left of its bound, so the parser never holds more of it.
            while data:
                if self._in_body:
                    super().data_received(data)
                    return
                room = HEAD_MAX_BYTES - self._head_b
                if room <= 0:
                    path = self.url.decode("latin-1")
                    message = f"the request line and headers are over {HEAD_MAX_BYTES // 2**10} KiB"
                    self._refuse(431, message, "head_too_large", path)
                    return
                piece, data = data[:room], data[room:]
                self._head_b += len(piece)
                super().data_received(piece)
                if self.transport.is_closing() or self.transport.get_protocol() is not self:
                    return  # refused as malformed, or handed over (an upgrade)

        def send_400_response(self, msg: str) -> None:
            # uvicorn's answer to what httptools cannot parse is plain text: ours is JSON, as every other.
            self._refuse(400, "the request is not valid HTTP/1.1", "invalid_http", self.url.decode("latin-1"))

        def handle_websocket_upgrade(self) -> None:
            self._disarm()  # the connection is the WebSocket protocol's from here
            super().handle_websocket_upgrade()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._in_body = True
            self._arm()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_body = False
            self._head_b = 0
            self.url = b""  # the next head's, once it begins
            self._disarm()  # the answer takes as long as it takes (a stream may run for minutes)
            super().on_message_complete()

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(request_timeout_s, self._timed_out)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _timed_out(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            cycle = self.cycle
            if not self._in_body and cycle is not None and not cycle.response_complete:
                # An answer is still going (a stream, its request whole): the next head is timed from its end.
                self._arm()
                return
            if self.pipeline:
                self.transport.close()  # requests wait behind an answer still going: no place for ours
                return
            if self._in_body and cycle is not None and cycle.scope is self.scope:
                # The app waits for the rest of the body: it hears the client is gone, and writes nothing.
                cycle.disconnected = True
                cycle.message_event.set()
                if cycle.response_started:
                    self.transport.close()
                    return
            what = "body" if self._in_body else "request line and headers"
            path = self.scope.get("path", "") if self._in_body else self.url.decode("latin-1")
            self._refuse(408, f"the {what} did not arrive within {request_timeout_s:g} s", "request_timeout", path)

        def _refuse(self, status: int, message: str, code: str, path: str) -> None:
            headers, body = error_answer(path, status, message, code)
            headers += [(b"content-length", str(len(body)).encode()), (b"connection", b"close")]
            head = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
            self.transport.write(STATUS_LINE[status] + head + b"\r\n" + body)
            self.transport.close()

    return LimitedHttpToolsProtocol


class BodyBudget:
    """The bytes of request bodies the daemon holds at once, against its budget."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.held_bytes = 0
        self._peak_since_trim = 0

    def take(self, size_b: int) -> bool:
        if self.held_bytes + size_b > self.budget_bytes:
            return False
        self.held_bytes += size_b
        self._peak_since_trim = max(self._peak_since_trim, self.held_bytes)
        return True

    def give_back(self, size_b: int) -> None:
        self.held_bytes -= size_b
        if self.held_bytes == 0 and self._peak_since_trim >= _TRIM_AFTER_BYTES:
            self._peak_since_trim = 0
            _trim_heap()


def _load_trim() -> Any:
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return getattr(libc, "malloc_trim", None)  # glibc only; elsewhere memory goes back as the allocator sees fit


_MALLOC_TRIM = _load_trim()


def _trim_heap() -> None:
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class _Refused(Exception):
    def __init__(self, status: int, message: str, code: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.retry_after_s = status, message, code, retry_after_s


class _ClientLeft(Exception):
    pass


class BodyLimits:
    """Reads each request's body whole, within `BODY_MAX_BYTES` and ``budget``, before ``app`` sees the
    request; then ``app`` receives it as one message. A request without a body passes straight through."""

    def __init__(self, app: ASGIApp, budget: BodyBudget) -> None:
        self._app = app
        self._budget = budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        declared_b, chunked, json_type = _body_headers(scope["headers"])
        if not declared_b and not chunked:
            await self._app(scope, receive, send)
            return
        max_b = BODY_MAX_BYTES if on_front_door(scope["path"]) else API_BODY_MAX_BYTES
        try:
            body, taken_b = await self._read(receive, declared_b, max_b)
        except _Refused as refused:
            await _answer(send, scope["path"], refused)
            return
        except _ClientLeft:  # gone, or closed with 408 by the protocol: nothing to answer, nothing to run
            return
        try:
            if json_type and body and not on_front_door(scope["path"]):
                await _check_depth(body)
        except _Refused as refused:
            self._budget.give_back(taken_b)
            await _answer(send, scope["path"], refused)
            return
        replay: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]
        del body

        async def whole() -> Message:
            return replay.pop() if replay else await receive()

        try:
            await self._app(scope, whole, send)
        finally:
            replay.clear()
            self._budget.give_back(taken_b)

    async def _read(self, receive: Receive, declared_b: int, max_b: int) -> tuple[bytes, int]:
        """The whole body, up to ``max_b``, and what it holds of the budget (given back here if it is
        refused)."""
        too_large = _Refused(413, f"the body is over {max_b // 2**20} MiB", "body_too_large")
        if declared_b > max_b:
            raise too_large
        # Taken as the bytes come, not as declared: a stranger's few bytes of headers must not hold the budget.
        taken_b = 0
        try:
            chunks: list[bytes] = []
            size_b = 0
            while True:
                message: MutableMapping[str, Any] = await receive()
                if message["type"] == "http.disconnect":
                    raise _ClientLeft()
                chunk = message.get("body", b"")
                size_b += len(chunk)
                if size_b > max_b:
                    raise too_large
                self._take(len(chunk))
                taken_b = size_b
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks), taken_b
        except BaseException:
            self._budget.give_back(taken_b)
            raise

    def _take(self, size_b: int) -> None:
        if not self._budget.take(size_b):
            held_mib = self._budget.held_bytes / 2**20
            raise _Refused(
                503,
                f"the daemon holds {held_mib:.0f} MiB of request bodies already (daemon.body_budget_mib"
                f" {self._budget.budget_bytes // 2**20}): retry shortly",
                "body_budget_exceeded",
                retry_after_s=_RETRY_AFTER_S,
            )


async def _answer(send: Send, path: str, refused: _Refused) -> None:
    headers, body = error_answer(
        path, refused.status, refused.message, refused.code, retry_after_s=refused.retry_after_s
    )
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": refused.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _body_headers(headers: list[tuple[bytes, bytes]]) -> tuple[int, bool, bool]:
    """The declared Content-Length (0 without one; httptools has refused a malformed one), whether the
    body comes chunked, and whether it is JSON as FastAPI reads it (declared so, or undeclared)."""
    declared_b, chunked = 0, False
    for name, value in headers:
        if name == b"content-length":
            declared_b = int(value) if value.isdigit() else 0
        elif name == b"transfer-encoding":
            chunked = True
    content_type = media_type(headers)
    return declared_b, chunked, content_type in _JSON_TYPES or content_type.endswith(b"+json")


async def _check_depth(body: bytes) -> None:
    """Refuse JSON nested past `JSON_MAX_DEPTH`; anything else is left to the API's own parsing."""
    try:
        await parse_json_body(body)
    except JsonTooDeep:
        raise _Refused(400, f"the JSON body nests deeper than {JSON_MAX_DEPTH} levels", "json_too_deep") from None
    except ValueError:
        pass
