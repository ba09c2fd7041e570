"""A small synchronous client of the daemon's REST API, for the CLI."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx

from launcher.errors import ConfigError, ConflictError, LauncherError, NotFoundError

_ERRORS_BY_STATUS: dict[int, type[LauncherError]] = {
    404: NotFoundError,
    409: ConflictError,
    422: ConfigError,
}


class DaemonUnreachable(LauncherError):
    pass


class DaemonClient:
    def __init__(self, url: str, token: str | None = None, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        token = token or os.environ.get("LAUNCHER_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # Loading the CA bundle costs 150 ms of every command; a plain-http URL never uses it.
        verify = not self.url.startswith("http://")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s, verify=verify)

    def close(self) -> None:
        self._http.close()

    def reachable(self) -> bool:
        """True when a launcher daemon answers (its health may be 200 or 503)."""
        try:
            response = self._http.get("/health", timeout=2.0)
        except httpx.HTTPError:
            return False
        return response.status_code in (200, 503) and "instances" in response.text

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise DaemonUnreachable(
                f"no launcher daemon answers at {self.url} ({type(exc).__name__})",
                hint="start it with `launcher serve`, or pass --url",
            ) from None
        if response.status_code >= 400:
            raise _error_from(response)
        return response.json()

    def instances(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._request("GET", "/instances")
        return result

    def instance(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"/instances/{name}")
        return result

    def act(self, name: str, verb: str) -> dict[str, Any]:
        """POST start|stop|restart; the instance's status after the act."""
        result: dict[str, Any] = self._request("POST", f"/instances/{name}/{verb}")
        return result

    def plan(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"/plan/{name}")
        return result

    def gpus(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._request("GET", "/gpus")
        return result

    def log_lines(self, name: str, tail: int, follow: bool) -> Iterator[str]:
        params: dict[str, str | int] = {"tail": tail, "follow": str(follow).lower()}
        try:
            with self._http.stream("GET", f"/instances/{name}/logs", params=params, timeout=None) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error_from(response)
                yield from response.iter_lines()
        except httpx.HTTPError as exc:
            raise DaemonUnreachable(f"lost the daemon at {self.url} ({type(exc).__name__})") from None


def _error_from(response: httpx.Response) -> LauncherError:
    try:
        body = response.json()
        message, hint = str(body.get("detail")), body.get("hint")
    except ValueError:
        message, hint = f"the daemon answered {response.status_code}", None
    if response.status_code == 401:
        hint = "set LAUNCHER_TOKEN or daemon.token_file to the daemon's token"
    return _ERRORS_BY_STATUS.get(response.status_code, LauncherError)(message, hint)
