"""Errors the front door answers itself, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
The types are those llama-server uses for the same cases, so a client sees one vocabulary."""

from __future__ import annotations

import json

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    421: "invalid_request_error",
    431: "invalid_request_error",
    429: "rate_limit_error",
    502: "server_error",
    503: "unavailable_error",
    504: "server_error",
}


class RouteError(Exception):
    """A request the front door answers with an error of its own."""

    def __init__(
        self, status: int, message: str, code: str, *, retry_after_s: int | None = None, instance: str | None = None
    ) -> None:
        """``instance``: what the request had reached, for its record (a peer's `peer:NAME`)."""
        super().__init__(message)
        self.instance = instance
        self.status = status
        self.message = message
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> bytes:
        error = {"message": self.message, "type": _TYPES[self.status], "param": None, "code": self.code}
        return json.dumps({"error": error}).encode()

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"application/json")]
        if self.retry_after_s is not None:
            headers.append((b"retry-after", str(self.retry_after_s).encode()))
        if self.status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        return headers


def on_front_door(path: str) -> bool:
    """Whether ``path`` is the front door's (/v1, /upstream): the rest is the REST API's."""
    return path.startswith("/v1/") or path.startswith("/upstream/")
