"""The peer's own errors as the client sees them through this front door: named with the peer, and a body
no error message needs passed on as it came, not held."""

from __future__ import annotations

import json
from collections.abc import MutableMapping, Sequence
from typing import Any

from starlette.types import Send

from launcher.config import Settings
from launcher.events import Bus
from launcher.route.peer import PeerForwarder
from launcher.route.proxy import Answer
from launcher.route.where import OnPeer
from launcher.rpc.peers import Peers
from launcher.schema_instances import Event


class _ErrorUpstream:
    """The peer's front door as `forward` meets it: a JSON error of ``body``, sent in 1 KiB pieces."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def forward(
        self, method: str, url: str, headers: list[tuple[bytes, bytes]], body: bytes, send: Send, arrived_s: float,
        *, extra: Sequence[tuple[str, str]] = (), naming: str | None = None,
    ) -> Answer:  # fmt: skip
        await send({"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"application/json")]})
        pieces = [self.body[i : i + 1024] for i in range(0, len(self.body), 1024)]
        for n, piece in enumerate(pieces):
            await send({"type": "http.response.body", "body": piece, "more_body": n < len(pieces) - 1})
        return Answer(status=503, streamed=False, ttfb_s=0.0, kept=b"")

    async def close(self) -> None:
        pass


async def _through_the_door(body: bytes) -> list[MutableMapping[str, Any]]:
    settings = Settings.model_validate({"peers": [{"name": "b", "url": "http://127.0.0.1:1"}]})
    forwarder = PeerForwarder(Peers(settings, events=Bus[Event](10), active=set), _ErrorUpstream(body))
    sent: list[MutableMapping[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    served = await forwarder.serve(OnPeer("b", "m"), "POST", "/v1/chat/completions", [], b"{}", send, 0.0)
    assert served.status == 503
    return sent


async def test_a_peers_error_names_the_peer() -> None:
    sent = await _through_the_door(json.dumps({"error": {"message": "idle is not running"}}).encode())
    assert json.loads(sent[-1]["body"]) == {"error": {"message": "peer b: idle is not running"}}


async def test_a_peers_error_body_past_any_message_is_passed_on_as_it_comes_not_held() -> None:
    body = json.dumps({"error": {"message": "x" * 1_000_000}}).encode()
    sent = await _through_the_door(body)
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert max(len(m["body"]) for m in bodies) <= 65 * 1024  # never the whole megabyte held at once
    assert b"".join(m["body"] for m in bodies) == body  # unchanged, in order
    assert not bodies[-1]["more_body"] and sent[0]["status"] == 503
