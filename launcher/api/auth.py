"""The API token: who may act (start, stop, restart) and, off loopback, who may read.

Mutations, and the servers' logs wherever a token is configured, check the token as a route dependency.
Reads are checked by a small ASGI middleware in front of everything but `GET /health`, so nothing a daemon
on a LAN shows (logs, plans, events, GPUs, metrics, the API's own description) answers without the token.
"""

from __future__ import annotations

import json
import secrets
from typing import Literal

from starlette.types import ASGIApp, Receive, Scope, Send

from launcher.schema import ErrorBody

_READS = frozenset({"GET", "HEAD"})
# /health: what systemd, Docker and Kubernetes probe without credentials. The dashboard's page and files
# hold nothing of the daemon's: they load, then the page asks for the token.
_OPEN_PATHS = frozenset({"/health", "/ui"})
_OPEN_PREFIX = "/ui/"

UNAUTHORISED = ErrorBody(detail="this needs Authorization: Bearer <token>", hint="see daemon.token_file")


def reads_need_token(auth_reads: Literal["auto", "always", "never"], loopback: bool) -> bool:
    return auth_reads == "always" or (auth_reads == "auto" and not loopback)


def bearer_matches(authorization: str | None, token: str) -> bool:
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(given.encode(), token.encode())


def _open(path: str) -> bool:
    return path in _OPEN_PATHS or path.startswith(_OPEN_PREFIX)


class ReadAuth:
    """ASGI middleware: reads (GET, HEAD) of anything but /health and the dashboard's files need the token."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self._app = app
        self._token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _READS or _open(scope["path"]):
            await self._app(scope, receive, send)
            return
        authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        if bearer_matches(authorization, self._token):
            await self._app(scope, receive, send)
            return
        body = json.dumps(UNAUTHORISED.model_dump()).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer"),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body if scope["method"] != "HEAD" else b""})
