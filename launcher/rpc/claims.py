"""The claims peers hold on the GPUs this host lends: leases, so that memory a claimer forgot (it crashed,
lost its network) comes back by itself.

A claimer registers its instance's MiB per lent GPU of one endpoint and renews the claim before its
time-to-live runs out (every `rpc.peer_interval_s`); a stop releases it at once. An rpc-server serves one
llama-server at a time, so an endpoint has at most one holder: a second is refused, not queued behind the
first. What the claims hold is planned around like the claims of this host's own instances.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from launcher.errors import ConfigError, ConflictError, NotFoundError
from launcher.schema_rpc import ClaimRequest, RpcClaim


@dataclass(frozen=True)
class _Lease:
    request: ClaimRequest
    expires: float  # on the book's clock


class ClaimBook:
    def __init__(
        self, on_expired: Callable[[ClaimRequest], None] = lambda _r: None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._on_expired = on_expired
        self._clock = clock
        self._leases: dict[str, _Lease] = {}  # by holder

    def register(
        self, request: ClaimRequest, lent: Mapping[str, Sequence[int]], usable_mib: Callable[[str], Mapping[int, int]]
    ) -> list[RpcClaim]:
        """Take or renew ``request``. ``lent``: each ready endpoint's GPUs; ``usable_mib(holder)``: MiB per GPU
        a llama-server may use with every claim but ``holder``'s counted. A renewal of the same claim is not
        measured again (its own memory is in use by then); anything else must fit."""
        self._expire()
        if request.endpoint not in lent:
            known = ", ".join(lent) or "none"
            raise NotFoundError(f"no ready rpc-server at {request.endpoint}", hint=f"ready endpoints: {known}")
        strangers = [g.gpu for g in request.devices if g.gpu not in lent[request.endpoint]]
        if strangers:
            raise ConfigError(f"{request.endpoint} lends GPUs {list(lent[request.endpoint])}, not {strangers}")
        on_endpoint = {h for h, lease in self._leases.items() if lease.request.endpoint == request.endpoint}
        others = sorted(on_endpoint - {request.holder})
        if others:
            raise ConflictError(
                f"{request.endpoint} is claimed by {', '.join(others)}: an rpc-server serves one llama-server at a time"
            )
        held = self._leases.get(request.holder)
        if held is None or (held.request.endpoint, held.request.devices) != (request.endpoint, request.devices):
            room = usable_mib(request.holder)
            short = [
                f"GPU {d.gpu}: {d.memory_mib} MiB asked, {room.get(d.gpu, 0)} usable"
                for d in request.devices
                if d.memory_mib > room.get(d.gpu, 0)
            ]
            if short:
                raise ConflictError(f"the claim on {request.endpoint} does not fit: {'; '.join(short)}")
        self._leases[request.holder] = _Lease(request, self._clock() + request.ttl_s)
        return self.on(request.endpoint)

    def release(self, holder: str) -> bool:
        """Drop ``holder``'s claim; False when it held none (already released, or expired)."""
        return self._leases.pop(holder, None) is not None

    def on(self, endpoint: str) -> list[RpcClaim]:
        """The live claims on ``endpoint``, with the time each has left."""
        self._expire()
        now = self._clock()
        return [
            RpcClaim(holder=holder, gpu=d.gpu, memory_mib=d.memory_mib, expires_in_s=round(lease.expires - now, 3))
            for holder, lease in self._leases.items()
            if lease.request.endpoint == endpoint
            for d in lease.request.devices
        ]

    def claims_mib(self, besides: str | None = None) -> dict[int, int]:
        """MiB per GPU the live claims hold (but ``besides``'s)."""
        self._expire()
        totals: dict[int, int] = {}
        for holder, lease in self._leases.items():
            if holder != besides:
                for d in lease.request.devices:
                    totals[d.gpu] = totals.get(d.gpu, 0) + d.memory_mib
        return totals

    def _expire(self) -> None:
        now = self._clock()
        for holder in [h for h, lease in self._leases.items() if lease.expires <= now]:
            self._on_expired(self._leases.pop(holder).request)
