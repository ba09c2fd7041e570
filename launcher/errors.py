"""The errors users see: one sentence, an optional hint, and the exit code and HTTP status they map to."""

from __future__ import annotations


class LauncherError(Exception):
    """Something asked for failed (exit 1)."""

    exit_code = 1
    http_status = 500

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message}\nhint: {self.hint}"


class ConfigError(LauncherError):
    """The configuration is invalid or points at something that does not exist (exit 2)."""

    exit_code = 2
    http_status = 422


class NotFoundError(LauncherError):
    """A model name or GPU index that does not exist (exit 2, HTTP 404)."""

    exit_code = 2
    http_status = 404


class ConflictError(LauncherError):
    """The act makes no sense in the instance's current state (HTTP 409)."""

    http_status = 409


class StartError(LauncherError):
    """The machine refuses the start: a port in use, for example (HTTP 503)."""

    http_status = 503
