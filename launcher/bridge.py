"""The bridge of an upgrade: a small process that answers on the daemon's listening socket while the old
program drains and the new one starts (its imports take about a second), so the API is never unanswered.

The old program spawns it (`python -m launcher.bridge`, its spec on stdin) before it stops accepting, and
waits until it serves; it is the daemon's child with a parent-death signal (setpriv, as the servers), so a
kill -9 of the daemon takes it along. It accepts on the same inherited socket and answers:
- `/health` with the health the old program had as it handed over;
- the front door's `/v1/*` by proxying to the servers being handed over (a routing table of model names
  and aliases to ports; `GET /v1/models` from it), with the front door's keys (route/keys.py);
- anything else with 503, Retry-After and the API's ErrorBody: the new program answers it in a moment.
The same Host and Origin rules as the daemon's guard it (api/origin.py's BrowserGuard). The new program,
once it serves, sends it SIGTERM: it stops accepting, finishes its proxied requests (drain_s at most),
and exits; the new program reaps it (launcher/upgrade.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
import socket
import sys
import time
from types import FrameType

import uvicorn
from pydantic import BaseModel, ConfigDict
from starlette.types import Receive, Scope, Send

from launcher.api.origin import BrowserGuard, HostNames
from launcher.route.errors import RouteError
from launcher.route.keys import check_key
from launcher.route.proxy import Upstream, UpstreamFailed
from launcher.schema import ErrorBody

READY = b"serving\n"  # its line on stdout once it accepts
_BODY_MAX_BYTES = 64 << 20
_SETTLE_S = 0.05
_ASKED_WITHIN_S = 5.0  # see `until_asked`; the new program answers meanwhile


class BridgeSpec(BaseModel):
    """What the old program tells the bridge, on its stdin (the keys are secrets: never in its argv)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    listen_fd: int
    hosts: HostNames
    cors_origins: list[str]
    keys: list[str] | None  # the front door's; None: open (a loopback bind without keys)
    routes: dict[str, list[int]]  # a model name or alias -> the ports of its serving servers
    health: str  # the JSON of `GET /health` as the hand-over began, and its status
    health_status: int
    drain_s: float
    # Past this, the new program has not taken over (it hangs as it starts): the bridge stops answering for it
    # (a /health of 200 from before the upgrade would hide that), and the API is unanswered until it serves.
    lifetime_s: float


async def _answer(send: Send, status: int, body: bytes, extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    headers = [(b"content-type", b"application/json"), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _body(receive: Receive) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > _BODY_MAX_BYTES:
            raise RouteError(413, "the request body is too large", "body_too_large")
        if not message.get("more_body", False):
            return b"".join(chunks)


class Bridge:
    """The ASGI app of the bridge (behind BrowserGuard)."""

    def __init__(self, spec: BridgeSpec, upstream: Upstream) -> None:
        self._spec = spec
        self._keys = None if spec.keys is None else frozenset(spec.keys)
        self._upstream = upstream
        self._turn = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        try:
            if path == "/health":
                await _answer(send, self._spec.health_status, self._spec.health.encode())
            elif path.startswith("/v1/"):
                check_key(self._keys, scope["headers"])
                await self._v1(scope, receive, send)
            else:
                why = ErrorBody(detail="the daemon is being upgraded", hint="ask again in a moment")
                await _answer(send, 503, why.model_dump_json().encode(), ((b"retry-after", b"1"),))
        except RouteError as exc:
            await _answer(send, exc.status, exc.body(), tuple(exc.headers()[1:]))

    async def _v1(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/v1/models":
            data = [{"id": name, "object": "model", "owned_by": "launcher"} for name in sorted(self._spec.routes)]
            await _answer(send, 200, json.dumps({"object": "list", "data": data}).encode())
            return
        if scope["method"] != "POST":
            raise RouteError(
                405, f"{scope['path']} takes POST with a JSON body that names a model", "method_not_allowed"
            )
        body = await _body(receive)
        try:
            model = json.loads(body)["model"]
            ports = self._spec.routes[model]
        except (ValueError, KeyError, TypeError):
            raise RouteError(503, "the daemon is being upgraded", "upgrading", retry_after_s=1) from None
        self._turn += 1
        port = ports[self._turn % len(ports)]
        query = "?" + scope["query_string"].decode("latin-1") if scope.get("query_string") else ""
        url = f"http://127.0.0.1:{port}{scope['path']}{query}"
        try:  # as the front door does: its headers dropped, the answer naming the model asked for
            await self._upstream.forward("POST", url, scope["headers"], body, send, time.monotonic(), naming=model)
        except UpstreamFailed as exc:
            if not exc.sent:
                raise RouteError(502, f"the model's server did not answer: {exc}", "upstream_failed") from None


class _Server(uvicorn.Server):
    """Says on stdout once it accepts (the old program waits for that before it stops accepting); SIGTERM
    stops its accepting at once, and its serving once its connections ended."""

    def __init__(self, config: uvicorn.Config, lifetime_s: float) -> None:
        super().__init__(config)
        self._lifetime_s = lifetime_s

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        sys.stdout.buffer.write(READY)
        sys.stdout.flush()
        asyncio.get_running_loop().call_later(self._lifetime_s, self._not_taken_over)

    def _not_taken_over(self) -> None:
        print(f"bridge: the new program did not take over within {self._lifetime_s:g} s: ending", file=sys.stderr)
        self._stop_then_exit(signal.SIGTERM, None)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler runs between any two bytecodes: the loop's own turn does the rest.
        asyncio.get_running_loop().call_soon_threadsafe(self._stop_then_exit, sig, frame)

    def _stop_then_exit(self, sig: int, frame: FrameType | None) -> None:
        stop_accepting(self)
        self._exiting = asyncio.get_running_loop().create_task(self._exit_once_asked(sig, frame))

    async def _exit_once_asked(self, sig: int, frame: FrameType | None) -> None:
        """uvicorn's end once every connection ended by itself (``_ASKED_WITHIN_S`` at most): its end closes
        the idle ones, and one whose request was on its way then is reset."""
        for _ in range(math.ceil(_ASKED_WITHIN_S / _SETTLE_S)):
            await asyncio.sleep(_SETTLE_S)
            if not self.server_state.connections:
                break
        super().handle_exit(sig, frame)


def stop_accepting(server: uvicorn.Server) -> None:
    """Accept no more connections on ``server``'s sockets, which stay open (others accept on them). Not
    asyncio's Server.close(): a connection it accepted in the same turn then fails to attach, and is left
    open unread until the process ends (its client's request is reset then)."""
    loop = asyncio.get_running_loop()
    for listener in server.servers:
        for sock in listener.sockets:
            loop.remove_reader(sock.fileno())


async def until_asked(server: uvicorn.Server, within_s: float) -> None:
    """Return once every connection ``server`` accepted sent its request (``within_s`` at most): its end
    closes a connection that sent none, and a request sent on it then is reset (a loaded host's client can
    take a while between its connect and its request)."""
    for _ in range(math.ceil(within_s / _SETTLE_S)):
        await asyncio.sleep(_SETTLE_S)  # an accepted connection gets its protocol in the next loop turn
        if all(getattr(connection, "cycle", None) is not None for connection in server.server_state.connections):
            return


async def _serve(spec: BridgeSpec) -> None:
    sock = socket.socket(fileno=spec.listen_fd)
    upstream = Upstream()
    try:
        app = BrowserGuard(Bridge(spec, upstream), spec.hosts, frozenset(spec.cors_origins))
        config = uvicorn.Config(
            app, log_level="warning", lifespan="off", timeout_graceful_shutdown=math.ceil(spec.drain_s)
        )
        await _Server(config, spec.lifetime_s).serve(sockets=[sock])  # SIGTERM: accept no more, finish, return
    finally:
        await upstream.close()


def main() -> None:
    spec = BridgeSpec.model_validate_json(sys.stdin.buffer.read())
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(spec))


if __name__ == "__main__":
    main()
