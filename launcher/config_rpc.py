"""Settings for GPUs across hosts: what this host's rpc-servers bind to (`rpc:`), and the other launchers
whose RPC workers and models it may use (`peers:`).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator

from launcher.address import reach
from launcher.config_fields import Period, Positive, StrictSettings


class RpcSettings(StrictSettings):
    """What the rpc-server entries of this host bind to."""

    # Declared before `listen`, whose check reads it.
    allow_public: bool = Field(
        default=False, description="Allow a public or wildcard `listen`: an RPC server has no authentication."
    )
    listen: str = Field(
        default="127.0.0.1",
        description="The IPv4 address every rpc-server binds: loopback or private (10/8, 172.16/12, "
        "192.168/16, 100.64/10) unless `allow_public`.",
    )
    peer_interval_s: Period = Field(
        default=5.0,
        description="How often each peer's `GET /rpc` is read, and the claims this host holds there renewed.",
    )
    claim_ttl_s: Positive = Field(
        default=30.0,
        description="A claim lives this long after its last renewal: a claimer that vanishes frees the memory by then.",
    )

    @field_validator("listen")
    @classmethod
    def _private(cls, value: str, info: ValidationInfo) -> str:
        where = reach(value)
        if where in ("public", "wildcard") and not info.data.get("allow_public", False):
            raise ValueError(
                f"{value} is a {where} address, and an RPC server has no authentication: anyone who reaches it "
                "uses its GPUs; use 127.0.0.1 or a private address, or set rpc.allow_public: true"
            )
        return value


class PeerSettings(StrictSettings):
    """Another launcher, whose RPC workers this one may plan onto: its API's URL and token."""

    url: str = Field(description="The peer's launcher API (`http://` or `https://`).")
    token_file: Path | None = Field(default=None, description="A file holding the peer's API token.")
    name: str | None = Field(default=None, description="How plans and `hosts:` name it; default the URL's host:port.")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("should be the http:// or https:// URL of the peer's launcher API")
        return value.rstrip("/")

    @property
    def label(self) -> str:
        return self.name or urlsplit(self.url).netloc
