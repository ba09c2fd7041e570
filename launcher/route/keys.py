"""The bearer keys of /v1 and /upstream (router.api_keys and the API token): one check, for the front door
and for the bridge that answers during an upgrade (launcher/bridge.py)."""

from __future__ import annotations

import secrets

from launcher.route.errors import RouteError


def check_key(keys: frozenset[str] | None, headers: list[tuple[bytes, bytes]]) -> None:
    """RouteError 401 unless ``headers`` carry one of ``keys`` (None: open, a loopback bind without keys)."""
    if keys is None:
        return
    given = b""
    for key, value in headers:
        if key == b"authorization":
            scheme, _, token = value.partition(b" ")
            given = token.strip() if scheme.lower() == b"bearer" else b""
        elif key == b"x-api-key":  # what Anthropic-style clients send to /v1/messages
            given = value.strip()
    if not any(secrets.compare_digest(given, k.encode()) for k in keys):
        raise RouteError(401, "this needs Authorization: Bearer <key> (one of router.api_keys)", "invalid_api_key")
