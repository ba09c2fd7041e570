"""Who may reach the daemon from a web browser: requests that name it by one of its own names (Host), sent
by a page of its own origin or of one the configuration lists (Origin, Sec-Fetch-Site).

Any page the user visits can send requests to 127.0.0.1: "simple" ones (a form, text/plain) go out without
the browser asking first, and a page that rebinds its own name to 127.0.0.1 (DNS rebinding) even reads the
answers, since to the browser they are then its own. Neither needs the user's help, and a loopback daemon
without a token trusts every local caller. So, before anything else and on every path:

- Host must be a loopback name (`localhost`, `127.0.0.1`, `[::1]`), the bind address, or a name of
  `daemon.allowed_hosts`, with any port; after a wildcard bind (0.0.0.0, ::) any IP address: a rebinding
  page makes the browser send its own name, never an address. Otherwise 421.
- A request with an Origin that is neither the daemon's own (the Host it came to) nor one of
  `daemon.cors_origins` is refused (403); so is one whose Sec-Fetch-Site says another site's page sent it,
  with no Origin of those (a no-cors GET has none: `<img src=/upstream/M/props>` would start an on-demand
  model), except a link followed to the dashboard. Reads are refused too, not only acts: an answer is never
  written for a page it was not meant for, whatever a server behind the front door would have allowed.

Requests without Origin or Sec-Fetch-* (curl, the OpenAI and Ollama clients, the CLI, peers) are not a
browser's page's: they pass, and the token is what stands in their way. CORS headers are answered, for the
configured origins only, by Starlette's middleware; the servers' own are dropped by the front door.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from launcher.api.refusals import error_answer
from launcher.config_daemon import DEFAULT_PORTS, DaemonSettings

_WILDCARD_BINDS = frozenset({"0.0.0.0", "::", ""})
# A Host header: a name or IPv4 address, or an IPv6 address in brackets; then an optional port.
_HOST = re.compile(r"(?:\[(?P<ip6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9.-]+))(?::(?P<port>[0-9]{1,5}))?")
# Sec-Fetch-Site values of a request another page sent ("same-site" includes every other port of localhost).
_OTHER_SITE = frozenset({"cross-site", "same-site"})
_DASHBOARD = frozenset({"/ui", "/ui/"})


def split_host(value: str) -> tuple[str, int | None] | None:
    """A Host header's name (lower case; an IPv6 address without brackets) and port; None if it is none."""
    found = _HOST.fullmatch(value.lower())
    if found is None:
        return None
    port = int(found["port"]) if found["port"] else None
    if port is not None and not 1 <= port <= 65535:
        return None
    name = found["ip6"] or found["name"]
    if found["ip6"] and _address(name) is None:
        return None
    return name, port


def _address(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


@dataclass(frozen=True)
class HostNames:
    """The names a request may give as its Host (without the port)."""

    names: frozenset[str]  # exact, lower case: localhost, the bind address, those configured
    suffixes: tuple[str, ...]  # ".example.com" for a configured "*.example.com"
    any_address: bool  # a wildcard bind: any IP address
    anything: bool  # a configured "*": the check is off

    @classmethod
    def of(cls, daemon: DaemonSettings) -> HostNames:
        configured = [name.lower().strip("[]") for name in daemon.allowed_hosts]
        wildcard = daemon.host in _WILDCARD_BINDS
        return cls(
            names=frozenset({"localhost", *configured, *([] if wildcard else [daemon.host.lower().strip("[]")])}),
            suffixes=tuple(name[1:] for name in configured if name.startswith("*.")),
            any_address=wildcard,
            anything="*" in configured,
        )

    def admit(self, name: str) -> bool:
        if self.anything or name in self.names or name.endswith(self.suffixes):
            return True
        address = _address(name)
        return address is not None and (address.is_loopback or self.any_address)


def same_origin(origin: str, host: tuple[str, int | None]) -> bool:
    """Whether ``origin`` (scheme://name[:port]) is the one the request came to (its Host's name and port;
    a port left out is the scheme's own, as a proxy in front may leave it out)."""
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return False
    default = DEFAULT_PORTS.get(parts.scheme)
    return default is not None and parts.hostname == host[0] and (port or default) == (host[1] or default)


def from_another_page(
    *,
    method: str,
    path: str,
    origin: str | None,
    fetch_site: str | None,
    fetch_mode: str | None,
    host: tuple[str, int | None],
    cors_origins: frozenset[str],
) -> str | None:
    """Why a request some other web page's script, form or element sent is refused; None if it was not."""
    if origin is not None and origin in cors_origins:
        return None
    if origin is not None and not same_origin(origin, host):
        return f"a page of another origin ({origin[:200]}) may not call this daemon"
    if fetch_site in _OTHER_SITE:  # no Origin (a no-cors GET), or its own with another site's fetch: forged
        if fetch_mode == "navigate" and method in ("GET", "HEAD") and path in _DASHBOARD:
            return None  # a link to the dashboard: the page loads, and its own requests are same-origin
        return f"a page of another site may not call this daemon (Sec-Fetch-Site: {fetch_site})"
    return None


class BrowserGuard:
    """ASGI middleware, outermost: the Host and cross-site checks above, then the app; a request from one
    of ``cors_origins`` goes through Starlette's CORS middleware (preflights, Access-Control-* headers)."""

    def __init__(self, app: ASGIApp, hosts: HostNames, cors_origins: frozenset[str]) -> None:
        self._app = app
        self._hosts = hosts
        self._cors_origins = cors_origins
        self._cors = CORSMiddleware(app, allow_origins=sorted(cors_origins), allow_methods=["*"], allow_headers=["*"])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        hosts: list[str] = []
        origin: str | None = None
        fetch_site: str | None = None
        fetch_mode: str | None = None
        for key, value in scope["headers"]:
            if key == b"host":
                hosts.append(value.decode("latin-1"))
            elif key == b"origin":
                origin = value.decode("latin-1")
            elif key == b"sec-fetch-site":
                fetch_site = value.decode("latin-1")
            elif key == b"sec-fetch-mode":
                fetch_mode = value.decode("latin-1")
        host = split_host(hosts[0]) if len(hosts) == 1 else None
        if host is None or not self._hosts.admit(host[0]):
            misdirected = f"this daemon answers only to its own names, not to {_named(hosts)}"
            await _refuse(scope, send, 421, misdirected, "misdirected", "add the name to daemon.allowed_hosts")
            return
        why = from_another_page(
            method=scope["method"],
            path=scope["path"],
            origin=origin,
            fetch_site=fetch_site,
            fetch_mode=fetch_mode,
            host=host,
            cors_origins=self._cors_origins,
        )
        if why is not None:
            await _refuse(scope, send, 403, why, "cross_site", "list the page's origin in daemon.cors_origins")
            return
        app = self._cors if origin is not None and origin in self._cors_origins else self._app
        await app(scope, receive, send)


def _named(hosts: list[str]) -> str:
    if not hosts:
        return "a request without a Host"
    if len(hosts) > 1:
        return "several Host headers"
    return f"Host {hosts[0][:200]!r}" if hosts[0] else "an empty Host"


async def _refuse(scope: Scope, send: Send, status: int, why: str, code: str, hint: str) -> None:
    """The refusal in the shape of the path's other errors: OpenAI's on the front door, ErrorBody elsewhere."""
    headers, body = error_answer(scope["path"], status, why, code, hint=hint)
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body if scope["method"] != "HEAD" else b""})
