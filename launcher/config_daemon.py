"""The daemon's settings (`daemon:`): where its API listens, its state directory, its token, its HTTP
limits, and the hosts and web origins it answers.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from launcher.config_fields import MemoryGib, Port, Positive, StrictSettings

LOG_MAX_MIB = 2**20
LOG_KEEP_MAX = 100


def default_state_dir() -> Path:
    # systemd's StateDirectory= (/var/lib/launcher, ~/.local/state/launcher for a user unit).
    if state_directory := os.environ.get("STATE_DIRECTORY"):
        return Path(state_directory.split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/launcher")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "launcher"


class DaemonSettings(StrictSettings):
    """The daemon: where its API listens, its state directory, its token and its HTTP limits."""

    host: str = Field(default="127.0.0.1", description="The address the API (and the front door) listens on.")
    port: Port = Field(default=8400, description="The API's port: REST API, front door, dashboard and metrics.")
    state_dir: Path = Field(
        default_factory=default_state_dir,
        description="Logs, the child registry and the lock: `$STATE_DIRECTORY` under systemd, else "
        "`/var/lib/launcher` for root, `~/.local/state/launcher` otherwise.",
    )
    token_file: Path | None = Field(
        default=None,
        description="A file holding the API token: acts need it, and reads too off loopback (`auth_reads`).",
    )
    instance_ports: tuple[Port, Port] = Field(
        default=(8410, 8499), description="`port: auto` instances get the first free port of this range."
    )
    # Bounded: the size is taken in whole bytes (an infinite one cannot be), and a rotation renames the kept
    # logs one by one on the event loop.
    log_max_mib: Annotated[float, Field(gt=0, le=LOG_MAX_MIB, allow_inf_nan=False)] = Field(
        default=50.0, description="Server logs are rotated (copy-truncate) past this size; at most 1 TiB."
    )
    log_keep: Annotated[int, Field(ge=1, le=LOG_KEEP_MAX)] = Field(
        default=3, description=f"How many rotated logs are kept per instance; at most {LOG_KEEP_MAX}."
    )
    auth_reads: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="Whether reads (logs, plans, events, GPUs, metrics) need the token; `auto`: when the daemon "
        "listens beyond loopback. `/health` never does.",
    )
    kv_cache_dir: Path | None = Field(
        default=None,
        description="Where llama-server instances save their slots' prompt caches when the launcher stops them "
        "on purpose, to restore them at their next start with the same file and settings; default "
        "`STATE_DIR/kv-cache`.",
    )
    kv_cache_max_gib: MemoryGib = Field(
        default=32.0,
        description="The saved prompt caches of all instances together stay under this size, least recently "
        "used deleted first.",
    )
    watch_config: bool = Field(
        default=False,
        description="Reload the configuration when its file changes, as `launcher reload` does (debounced; only "
        "a change of its content counts).",
    )
    ready_when: Literal["listening", "loaded"] = Field(
        default="listening",
        description="When systemd hears `READY=1`: once the API listens and the autostart instances are "
        "launched, or once each of them is loaded (ready, or failed for good), so units ordered `After=` it "
        "find them serving.",
    )
    allow_readable_secrets: bool = Field(
        default=False,
        description="A token file readable by others (or, if it is your own, by its group) is refused, as ssh "
        "refuses such a key; true accepts one with a warning at every load.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Names and addresses (no port) a request may give as its `Host` besides localhost, loopback "
        "addresses and the bind address (after a wildcard bind, any address); `*.example.com` admits every "
        "name under it, `*` any name. Others are refused with 421 (DNS rebinding).",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins (`scheme://host[:port]`) whose web pages may call the API, answered with CORS "
        "headers; pages of any other origin are refused with 403.",
    )

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if name != "*" and not _HOST_NAME.fullmatch(name.removeprefix("*.")) and not _is_address(name.strip("[]")):
                raise ValueError(f"{name!r} should be a host name or an address without a port, *.DOMAIN or *")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        return [_origin(origin) for origin in value]

    # HTTP limits hold before any authentication.
    request_timeout_s: Positive = Field(
        default=30.0,
        description="A request's line and headers, and then its body, must each arrive within this many "
        "seconds, else 408 and the connection is closed.",
    )
    body_budget_mib: Annotated[int, Field(ge=64)] = Field(
        default=256,
        description="The request bodies the daemon holds at once, all connections together; beyond it 503 with "
        "`Retry-After`.",
    )

    @field_validator("instance_ports")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] > value[1]:
            raise ValueError("the first port of the range must not be above the last")
        return value

    @property
    def url(self) -> str:
        """Where the API listens (an IPv6 host in brackets)."""
        return _http_url(self.host, self.port)

    @property
    def client_url(self) -> str:
        """Where a client on this machine reaches it: a wildcard bind is reached on loopback."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return _http_url(host, self.port)


_HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*", re.IGNORECASE)
DEFAULT_PORTS = {"http": 80, "https": 443}  # a URL's port when it names none (origins here and in api/origin.py)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _origin(text: str) -> str:
    """An origin as a browser writes it in its Origin header: lower case, without the scheme's own port."""
    if text == "*":
        raise ValueError("list each origin: '*' would let every web page act on the daemon")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{text!r} is not an origin: {exc}") from None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.username or parts.path not in ("", "/"):
        raise ValueError(f"{text!r} should be an origin: http:// or https://, a host and an optional port, no path")
    if parts.query or parts.fragment:
        raise ValueError(f"{text!r} should be an origin, without a query or fragment")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, DEFAULT_PORTS[parts.scheme]) else "")


def _http_url(host: str, port: int) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"
