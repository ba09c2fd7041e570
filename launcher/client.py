"""A typed synchronous client of the daemon's REST API, for the CLI: it speaks the wire types (launcher/schema*.py).

Built on the standard library's http.client: a command makes one to a few requests on one kept-alive
connection, and httpx's import (about 40 ms) would be most of a `launcher status`.
"""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Iterator
from typing import TypeVar
from urllib.parse import quote, urlencode, urlsplit

from pydantic import BaseModel, ValidationError

from launcher.errors import ConfigError, ConflictError, LauncherError, NotFoundError, StartError
from launcher.schema import ErrorBody
from launcher.schema_front_door import ModelList, ServedModel
from launcher.schema_gpus import GpuSample
from launcher.schema_instances import Health, InstanceStatus
from launcher.schema_plans import Plan
from launcher.schema_reload import ReloadReport, RollReport, UpgradeStarted
from launcher.schema_rpc import ClaimRequest, PeerStatus, RpcClaim, RpcReport

_ERRORS_BY_STATUS: dict[int, type[LauncherError]] = {
    404: NotFoundError,
    409: ConflictError,
    422: ConfigError,
    503: StartError,
}
_REACH_TIMEOUT_S = 2.0
# An act answers once the old server has drained (drain_timeout_s) and is stopped (stop_timeout) and the
# memory it held is back (vram_wait_s).
_ACT_TIMEOUT_S = 300.0
# A model's replicas roll one after another, each answering once loaded: the daemon bounds each by its
# `health.load_timeout` (15 min by default). A reload answers once the servers it restarted (rolled) or
# added are ready or have failed.
_ROLL_TIMEOUT_S = 4 * 3600.0

M = TypeVar("M", bound=BaseModel)


class DaemonUnreachable(LauncherError):
    pass


class DaemonClient:
    def __init__(self, url: str, token: str | None = None, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        try:
            parts = urlsplit(self.url)
            port = parts.port  # raises for a port that is not a number or out of range
        except ValueError as exc:
            raise ConfigError(f"the daemon's URL {url!r} is not valid: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"the daemon's URL {url!r} is not an http:// or https:// URL")
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, port or (443 if self._https else 80)
        self._base = parts.path
        token = token or os.environ.get("LAUNCHER_TOKEN")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout_s = timeout_s
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self, timeout_s: float | None) -> http.client.HTTPConnection:
        if self._conn is None:
            kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = kind(self._host, self._port, timeout=self._timeout_s)
        self._conn.timeout = timeout_s
        if self._conn.sock is not None:
            self._conn.sock.settimeout(timeout_s)
        return self._conn

    def _send(
        self, method: str, path: str, timeout_s: float | None, body: bytes | None = None
    ) -> http.client.HTTPResponse:
        """The response to one request. A read on a kept-alive connection the daemon closed meanwhile is
        sent again on a new one; an act never is (a restart must not happen twice)."""
        for attempt in (1, 2):
            reused = self._conn is not None
            conn = self._connection(timeout_s)
            try:
                headers = {**self._headers, "Content-Type": "application/json"} if body is not None else self._headers
                conn.request(method, self._base + path, body=body, headers=headers)
                return conn.getresponse()
            except TimeoutError:
                self.close()
                raise DaemonUnreachable(
                    f"the daemon at {self.url} did not answer within {timeout_s:g}s",
                    hint="it may still be acting: `launcher status` shows where it is",
                ) from None
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self.close()
                if attempt == 2 or not reused or method != "GET":
                    raise DaemonUnreachable(f"lost the daemon at {self.url} ({type(exc).__name__})") from None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise DaemonUnreachable(
                    f"no launcher daemon answers at {self.url} ({type(exc).__name__})",
                    hint="start it with `launcher serve`, or pass --url",
                ) from None
        raise AssertionError("unreachable")

    def _request(self, method: str, path: str, timeout_s: float | None = None, body: bytes | None = None) -> bytes:
        response = self._send(method, path, timeout_s or self._timeout_s, body)
        try:
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise DaemonUnreachable(f"lost the daemon at {self.url} ({type(exc).__name__})") from None
        if response.status >= 400:
            raise _error_from(response.status, body)
        return body

    def _get(self, model: type[M], path: str) -> M:
        return _parse(model, self._request("GET", path))

    def _get_list(self, model: type[M], path: str) -> list[M]:
        return _parse_list(model, self._request("GET", path))

    def health(self) -> Health | None:
        """The daemon's health (200 or 503 both mean a launcher answers), or None when none answers."""
        try:
            response = self._send("GET", "/health", _REACH_TIMEOUT_S)
            body = response.read()
        except (LauncherError, OSError, http.client.HTTPException):
            self.close()
            return None
        if response.status not in (200, 503):
            return None
        try:
            return Health.model_validate_json(body)
        except ValidationError:
            return None  # something else listens there

    def reachable(self) -> bool:
        return self.health() is not None

    def instances(self) -> list[InstanceStatus]:
        return self._get_list(InstanceStatus, "/instances")

    def instance(self, name: str) -> InstanceStatus:
        return self._get(InstanceStatus, f"/instances/{quote(name, safe='')}")

    def act(self, name: str, verb: str) -> InstanceStatus:
        """POST start|stop|restart; the instance's status after the act."""
        path = f"/instances/{quote(name, safe='')}/{verb}"
        return _parse(InstanceStatus, self._request("POST", path, _ACT_TIMEOUT_S))

    def restart(self, name: str) -> InstanceStatus | RollReport:
        """POST restart: an instance's status as its restart began, or (a model run as replicas) how its
        replicas rolled, once the roll is over."""
        body = self._request("POST", f"/instances/{quote(name, safe='')}/restart", _ROLL_TIMEOUT_S)
        try:
            rolled = "order" in json.loads(body)
        except (ValueError, TypeError):
            rolled = False  # not JSON: the parse below says so
        return _parse(RollReport, body) if rolled else _parse(InstanceStatus, body)

    def reload(self, dry_run: bool) -> ReloadReport:
        """POST /config/reload: the daemon reads its configuration again; what it did (or would do)."""
        path = "/config/reload" + ("?dry_run=true" if dry_run else "")
        return _parse(ReloadReport, self._request("POST", path, _ROLL_TIMEOUT_S))

    def upgrade(self) -> UpgradeStarted:
        """POST /daemon/upgrade: the daemon executes its program again, handing its servers over."""
        return _parse(UpgradeStarted, self._request("POST", "/daemon/upgrade", _ACT_TIMEOUT_S))

    def plan(self, name: str, estimate: bool = False) -> Plan:
        query = "?estimate=true" if estimate else ""
        return self._get(Plan, f"/plan/{quote(name, safe='')}{query}")

    def gpus(self) -> list[GpuSample]:
        return self._get_list(GpuSample, "/gpus")

    def rpc(self) -> RpcReport:
        return self._get(RpcReport, "/rpc")

    def models(self) -> list[ServedModel]:
        """The front door's models (the API token is one of its keys)."""
        return self._get(ModelList, "/v1/models").data

    def peers(self) -> list[PeerStatus]:
        return self._get_list(PeerStatus, "/peers")

    def claim(self, request: ClaimRequest) -> list[RpcClaim]:
        """Take or renew a claim on one of the daemon's rpc-servers; the claims on it after."""
        return _parse_list(RpcClaim, self._request("POST", "/rpc/claims", body=request.model_dump_json().encode()))

    def release(self, holder: str) -> None:
        self._request("DELETE", f"/rpc/claims/{quote(holder, safe='')}")

    def log_lines(self, name: str, tail: int, follow: bool) -> Iterator[str]:
        query = urlencode({"tail": tail, "follow": str(follow).lower()})
        response = self._send(
            "GET", f"/instances/{quote(name, safe='')}/logs?{query}", None if follow else self._timeout_s
        )
        if response.status >= 400:
            raise _error_from(response.status, response.read())
        try:
            while line := response.readline():
                yield line.decode(errors="replace").rstrip("\n")
        except (OSError, http.client.HTTPException) as exc:
            raise DaemonUnreachable(f"lost the daemon at {self.url} ({type(exc).__name__})") from None
        finally:
            self.close()  # a followed stream is not reusable


def _parse(model: type[M], body: bytes) -> M:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise LauncherError(f"the daemon's answer is not what this launcher expects: {exc}") from None


def _parse_list(model: type[M], body: bytes) -> list[M]:
    try:
        return [model.model_validate(item) for item in json.loads(body)]
    except (ValidationError, ValueError, TypeError) as exc:
        raise LauncherError(f"the daemon's answer is not what this launcher expects: {exc}") from None


def _error_from(status: int, body: bytes) -> LauncherError:
    try:
        error = ErrorBody.model_validate_json(body)
        message, hint = error.detail, error.hint
    except ValidationError:
        message, hint = f"the daemon answered {status}", None
    if status == 401:
        hint = "set LAUNCHER_TOKEN or daemon.token_file to the daemon's token"
    return _ERRORS_BY_STATUS.get(status, LauncherError)(message, hint)
