"""The wire types of GPUs across hosts: this host's RPC endpoints and their claims, and what it read of its
peers.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from launcher.schema import WireModel
from launcher.schema_front_door import ServedModel


class RpcDevice(WireModel):
    """A GPU an rpc-server lends, as this host's GPU sampler last read it."""

    gpu: int
    uuid: str
    name: str
    memory_total_mib: int | None
    memory_free_mib: int | None
    # What a llama-server elsewhere may put on it: min(free, total - this host's claims) less its margin
    # and reserve (the rpc-server's own driver context is one of those claims). None: not readable.
    usable_mib: int | None = None


class RpcClaim(WireModel):
    """Memory a llama-server elsewhere has reserved on a lent GPU (registered by the peer that plans it)."""

    holder: str  # who: the peer and its instance
    gpu: int
    memory_mib: int
    expires_in_s: float = 0.0  # the lease: gone unless its holder renews it by then


class ClaimDevice(WireModel):
    gpu: int
    memory_mib: Annotated[int, Field(ge=0)]


class ClaimRequest(WireModel):
    """`POST /rpc/claims`: reserve (or renew) ``devices`` of one endpoint for ``holder`` for ``ttl_s``."""

    holder: Annotated[str, Field(min_length=1)]  # the claiming launcher's URL and instance: `http://a:8400#big`
    endpoint: Annotated[str, Field(min_length=1)]  # HOST:PORT of the rpc-server (one holder per endpoint)
    devices: Annotated[list[ClaimDevice], Field(min_length=1)]
    # A lease: gone unless renewed by then. At most 10 minutes: a vanished claimer's memory comes back.
    ttl_s: Annotated[float, Field(gt=0, le=600)]


class RpcEndpoint(WireModel):
    """One ready rpc-server of this host: where to point `llama-server --rpc`, and what it lends."""

    name: str  # its instance
    endpoint: str  # HOST:PORT
    protocol: str  # its RPC protocol version: a llama-server needs the same major
    server_devices: int  # devices the server itself reports (on a CPU-only build: the CPU)
    devices: list[RpcDevice]
    clients: list[str]  # HOST:PORT of each connection now: it serves one, the others wait
    claims: list[RpcClaim] = []


class RpcReport(WireModel):
    """`GET /rpc`: this host's RPC endpoints, for peers that plan onto them."""

    endpoints: list[RpcEndpoint]


class PeerStatus(WireModel):
    """`GET /peers`: what this daemon last read of one peer's `GET /rpc` and its front door's models."""

    name: str
    url: str
    reachable: bool
    error: str | None  # why the last read failed
    read_s_ago: float | None  # None: never read
    endpoints: list[RpcEndpoint]  # as last read (kept through a failure, but not planned onto then)
    # The models its own servers serve, as last read (kept through a failure, not routed to then).
    models: list[ServedModel] = []
