"""The daemon's own error answers, in the shape of the part a path is for: light (no router, no server
modules), so that the upgrade's bridge (launcher/bridge.py) answers as the daemon does."""

from __future__ import annotations

from launcher.route.errors import RouteError, on_front_door
from launcher.schema import ErrorBody


def error_answer(
    path: str, status: int, message: str, code: str, *, retry_after_s: int | None = None, hint: str | None = None
) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Headers and body of an error in the shape of the part of the daemon ``path`` is for: OpenAI's on
    the front door (the hint in the message), `ErrorBody` on the API."""
    if on_front_door(path):
        said = message if hint is None else f"{message} ({hint})"
        error = RouteError(status, said, code, retry_after_s=retry_after_s)
        return error.headers(), error.body()
    headers = [(b"content-type", b"application/json")]
    if retry_after_s is not None:
        headers.append((b"retry-after", str(retry_after_s).encode()))
    return headers, ErrorBody(detail=message, hint=hint).model_dump_json(exclude_none=True).encode()
