"""Forwarding a request to the front door of the peer that serves its model: the same path, the peer's
token as the key, the answer streamed back as a local one is (the same Upstream), and the peer named in
every error the client sees, the peer's own ones included."""

from __future__ import annotations

import json
from collections.abc import MutableMapping
from typing import Any

from starlette.types import Send

from launcher.route.errors import RouteError
from launcher.route.proxy import UpstreamClient, UpstreamFailed
from launcher.route.served import Served
from launcher.route.where import PEER_RETRY_S, OnPeer
from launcher.rpc.peers import Peers
from launcher.schema_rpc import PeerStatus


class PeerForwarder:
    def __init__(self, peers: Peers | None, upstream: UpstreamClient) -> None:
        self._peers = peers
        self._upstream = upstream

    def statuses(self) -> list[PeerStatus]:
        return self._peers.statuses() if self._peers is not None else []

    async def serve(
        self, place: OnPeer, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes, send: Send,
        arrived_s: float,
    ) -> Served:  # fmt: skip
        """``path``: as the client sent it (with its query), which the peer's front door routes again."""
        assert self._peers is not None  # where() names a peer only when there are some
        instance = f"peer:{place.peer}"
        door = self._peers.front_door(place.peer)
        if door is None:
            why = f"peer {place.peer} was removed from the configuration"
            raise RouteError(503, why, "peer_unreachable", retry_after_s=PEER_RETRY_S, instance=instance)
        url, token = door
        naming = _NamingErrors(place.peer, send)
        auth = [("Authorization", f"Bearer {token}")] if token else []
        try:
            answer = await self._upstream.forward(method, url + path, headers, body, naming, arrived_s, extra=auth)
        except UpstreamFailed as exc:
            if exc.sent and naming.sent:  # the client has the status already; the request failed all the same
                return Served(status=502, instance=instance)
            if not exc.reached:
                why = f"peer {place.peer} is not reachable: {exc.reason}"
                raise RouteError(503, why, "peer_unreachable", retry_after_s=PEER_RETRY_S, instance=instance) from None
            raise RouteError(
                502, f"peer {place.peer} failed: {exc.reason}", "upstream_failed", instance=instance
            ) from None
        return Served(status=answer.status, instance=instance, answer=answer)


_HELD_MAX_BYTES = 64 * 1024  # an error's body held to name the peer in it: an error's message is far shorter


class _NamingErrors:
    """A `send` that passes answers on as they come, except a JSON error, which it holds whole to put the
    peer's name in front of its message: a client must see which host failed, not only the peer's words."""

    def __init__(self, peer: str, send: Send) -> None:
        self._peer = peer
        self._send = send
        self._start: MutableMapping[str, Any] | None = None
        self._held: list[bytes] = []
        self.sent = False  # whether the client got the answer's start

    async def __call__(self, message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400 and _json(message["headers"]):
            self._start = message
            return
        if self._start is None:
            self.sent = True
            await self._send(message)
            return
        self._held.append(message.get("body", b""))
        more = message.get("more_body", False)
        if sum(map(len, self._held)) > _HELD_MAX_BYTES:  # no error message is this long: passed on as it is
            start, held, self._start, self._held = self._start, self._held, None, []
            self.sent = True
            await self._send(start)
            await self._send({"type": "http.response.body", "body": b"".join(held), "more_body": more})
            return
        if more:
            return
        body = self._named(b"".join(self._held))
        headers = [(k, v) for k, v in self._start["headers"] if k != b"content-length"]
        self.sent = True
        await self._send({**self._start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await self._send({"type": "http.response.body", "body": body})

    def _named(self, body: bytes) -> bytes:
        try:
            doc = json.loads(body)
        except ValueError:  # compressed, or not the JSON it said: passed on as it is
            return body
        error = doc.get("error") if isinstance(doc, dict) else None
        if not isinstance(error, dict) or not isinstance(error.get("message"), str):
            return body
        error["message"] = f"peer {self._peer}: {error['message']}"
        return json.dumps(doc).encode()


def _json(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(k == b"content-type" and v.startswith(b"application/json") for k, v in headers)
