"""The daemon's port: `/v1/...` and `/upstream/{model}/...` go to the front door, everything else to the
REST API. The front door is plain ASGI in front of the API's framework: on this path every request pays
for each layer (bench/router.py), and its errors are OpenAI's shape, not the API's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import datetime
from typing import Any, TypeVar

from starlette.types import ASGIApp, Receive, Scope, Send

from launcher.route import upstream_paths
from launcher.route.errors import RouteError, on_front_door
from launcher.route.keys import check_key
from launcher.route.off_loop import for_body
from launcher.route.prefix_ring import prefix_key
from launcher.route.router import Router
from launcher.route.served import Served
from launcher.route.where import OnPeer, peer_models

T = TypeVar("T")
_CLIENT_LEFT = 499  # nginx's code for a request whose client went away before its answer
# Deeper JSON is refused: no client nests a request this deep, and Python's parser ends in RecursionError
# (a traceback) somewhere below 1,000 levels.
JSON_MAX_DEPTH = 64


class _ClientLeft(Exception):
    pass


class JsonTooDeep(ValueError):
    pass


class FrontDoor:
    def __init__(self, api: ASGIApp, router: Router, keys: frozenset[str] | None) -> None:
        """``keys``: the bearer keys /v1 and /upstream take; None: open (a loopback bind without keys)."""
        self._api = api
        self._router = router
        self._keys = keys
        self._created = int(time.time())
        self._in_flight = 0
        self._quiet = asyncio.Event()  # no request in flight through the door (an upgrade waits for it)
        self._quiet.set()

    async def quiet(self) -> None:
        """Return once no request is in flight through the door (the API's own requests do not count)."""
        await self._quiet.wait()

    def use_keys(self, keys: frozenset[str] | None) -> None:
        """Take the keys of a reload (router.api_keys) from the next request on."""
        self._keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and on_front_door(scope.get("path", "")):
            self._in_flight += 1
            self._quiet.clear()
            try:
                await self._door(scope, receive, send)
            finally:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._quiet.set()
        else:
            await self._api(scope, receive, send)

    async def _door(self, scope: Scope, receive: Receive, send: Send) -> None:
        arrived_s = time.monotonic()
        arrived = datetime.now().astimezone().isoformat(timespec="milliseconds")
        method, path = scope["method"], scope["path"]
        model = ""
        started = answered = False

        async def tracked(message: MutableMapping[str, Any]) -> None:
            nonlocal started, answered
            started = True
            await send(message)
            answered = message["type"] == "http.response.body" and not message.get("more_body", False)

        try:
            self._check_key(scope["headers"])
            if path == "/v1/models" or path.startswith("/v1/models/"):
                if method not in ("GET", "HEAD"):
                    raise RouteError(405, "/v1/models takes GET", "method_not_allowed")
                body = self._models(path.removeprefix("/v1/models").removeprefix("/") or None)
                await _answer(send, 200, body if method == "GET" else b"", [(b"content-type", b"application/json")])
                return
            if method == "POST" and path.startswith("/v1/") and not _declares_json(scope["headers"]):
                raise RouteError(415, "a POST to /v1 takes a Content-Type: application/json body", "unsupported_media")
            body = await _read_body(receive)
            upstream = path.startswith("/upstream/")
            # As the client sent it, still encoded: a %2F stays a character of its segment.
            raw = (scope.get("raw_path") or path.encode()).decode("latin-1")
            query = "?" + scope["query_string"].decode("latin-1") if scope.get("query_string") else ""
            if upstream:
                name, _, server_path = path.removeprefix("/upstream/").partition("/")
                why = upstream_paths.refusal(method, server_path)
                if why is not None:
                    raise RouteError(403, why, "launcher_owned")
                place = self._router.place(name)
                target = "/" + raw.removeprefix("/upstream/").partition("/")[2]
            else:
                if method != "POST":
                    raise RouteError(
                        405, f"{path} takes POST with a JSON body that names a model", "method_not_allowed"
                    )
                doc = await _json_with_model(body)
                place = self._router.place(doc["model"])
                target = path
            model = place.model
            if isinstance(place, OnPeer):  # the peer's front door routes the same path again
                serving = self._router.to_peers.serve(
                    place, method, raw + query, scope["headers"], body, tracked, arrived_s
                )
            else:
                naming = None if upstream else doc["model"]  # the answer names what the client asked for
                prefix = await _upstream_prefix(method, body) if upstream else prefix_key(doc)
                if not upstream:
                    body = await for_body(body, functools.partial(self._router.body_for, model, doc, body))
                serving = self._router.serve(
                    model, method, target + query, scope["headers"], body, tracked, arrived_s,
                    queued=not upstream, naming=naming, prefix=prefix,
                )  # fmt: skip
            served = await _until_client_leaves(receive, serving, lambda: answered)
        except RouteError as exc:
            if not started:
                await _answer(send, exc.status, exc.body() if method != "HEAD" else b"", exc.headers())
            if exc.status == 401:
                return  # not recorded: a stranger's requests must not push the real ones out of the record
            served = Served(status=exc.status, instance=exc.instance)
        except _ClientLeft:
            served = Served(status=_CLIENT_LEFT, instance=None)
        await self._router.request_log.record(model, method, path, arrived, served, time.monotonic() - arrived_s)

    def _check_key(self, headers: list[tuple[bytes, bytes]]) -> None:
        check_key(self._keys, headers)

    def _models(self, one: str | None) -> bytes:
        """The list of models and aliases with their states; or ``one`` of them (404 when unknown)."""
        data = []
        for name, model in self._router.configured.items():
            state = self._router.state_of(name).value
            entry = {"object": "model", "created": self._created, "owned_by": "launcher", "state": state}
            data.append({"id": name, **entry, "aliases": list(model.aliases)})
            data += [{"id": alias, **entry, "alias_of": name} for alias in model.aliases]
        for name, (peer, served) in peer_models(self._router.names, self._router.to_peers.statuses()).items():
            entry = {
                "object": "model",
                "created": self._created,
                "owned_by": f"peer:{peer.name}",
                "state": served.state,
            }
            shown = {"aliases": served.aliases} if served.alias_of is None else {"alias_of": served.alias_of}
            data.append({"id": name, **entry, **shown, "peer": peer.name, "reachable": peer.reachable})
        if one is None:
            return json.dumps({"object": "list", "data": data}).encode()
        found = next((d for d in data if d["id"] == one), None)
        if found is None:
            self._router.place(one)  # raises: 404 naming the known ones
        return json.dumps(found).encode()


def media_type(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The body's declared media type, lower case and without parameters (b"" when none is declared). The
    first Content-Type counts, as Starlette reads it for the API: every check of the daemon reads it so."""
    found = next((value for key, value in headers if key == b"content-type"), b"")
    return found.partition(b";")[0].strip().lower()


def _declares_json(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the body is declared JSON: every OpenAI client sends it, and a page of another origin cannot
    without asking the browser's preflight first, which the door refuses (launcher/api/origin.py)."""
    return media_type(headers) == b"application/json"


def loads_json(body: bytes) -> Any:
    """``body`` parsed as JSON; JsonTooDeep past `JSON_MAX_DEPTH` levels, ValueError when it is not JSON."""
    try:
        doc = json.loads(body)
    except RecursionError:
        raise JsonTooDeep() from None
    level = [doc] if isinstance(doc, (dict, list)) else []
    for _depth in range(JSON_MAX_DEPTH):
        inner: list[Any] = []
        for container in level:
            items = container.values() if isinstance(container, dict) else container
            inner += (item for item in items if isinstance(item, (dict, list)))
        if not inner:
            return doc
        level = inner
    raise JsonTooDeep()


async def parse_json_body(body: bytes) -> Any:
    """``body`` parsed by `loads_json`; a large one in a thread (`for_body`)."""
    return await for_body(body, functools.partial(loads_json, body))


async def _json_with_model(body: bytes) -> dict[str, Any]:
    try:
        doc = await parse_json_body(body)
    except JsonTooDeep:
        raise RouteError(400, f"the JSON body nests deeper than {JSON_MAX_DEPTH} levels", "json_too_deep") from None
    except ValueError:
        raise RouteError(
            400, "the body is not JSON: it must be a JSON object that names a model", "invalid_json"
        ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), str):
        raise RouteError(400, 'the body must be a JSON object with a "model" (a name or an alias)', "model_missing")
    return doc


async def _upstream_prefix(method: str, body: bytes) -> str | None:
    """The prefix key of a request passed through to a server (Ollama's /api/chat and /api/generate): its
    body read as a chat or a completion when it is JSON, else none."""
    if method != "POST" or not body:
        return None
    try:
        return prefix_key(await parse_json_body(body))
    except ValueError:  # not JSON, or nested too deep: passed on without a key
        return None


async def _read_body(receive: Receive) -> bytes:
    """The body, already read whole and bounded in size by launcher/api/limits.py in front."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientLeft()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _until_client_leaves(receive: Receive, serving: Awaitable[T], answered: Callable[[], bool]) -> T:
    """``serving``'s result; cancelled (its upstream request closed, its queue place given up) when the
    client disconnects first: the server then stops generating and frees its slot. A client that leaves
    once its whole answer was sent (a stream's reader closes the connection at its end) did not leave
    early: the request is recorded as served."""
    work = asyncio.ensure_future(serving)
    left = asyncio.ensure_future(_disconnect(receive))
    try:
        await asyncio.wait((work, left), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the daemon is shutting down: the request goes with it
        work.cancel()
        raise
    finally:
        left.cancel()
    if not work.done() and answered():
        return await work
    if not work.done():
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
        raise _ClientLeft()
    return work.result()


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _answer(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
