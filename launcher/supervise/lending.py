"""What this host's GPUs hold and lend: the one sum of the memory taken (this host's plans and the claims
peers hold), the ready rpc-servers and the GPUs they lend, the peers' claims on them (launcher/rpc/claims.py:
leases, one holder per endpoint) and what a peer's llama-server may still use of each GPU (`GET /rpc`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from launcher.config_gpus import GpuSettings
from launcher.plan.model_plan import usable_gpus
from launcher.rpc.claims import ClaimBook
from launcher.schema_gpus import GpuSample
from launcher.schema_rpc import ClaimRequest, RpcClaim, RpcReport
from launcher.supervise.instance import Instance
from launcher.supervise.rpc_report import ready_rpc_servers, rpc_report


class LatestReadings(Protocol):
    def latest(self) -> Sequence[GpuSample]: ...


def claims_total(held: Iterable[Mapping[int, int]]) -> dict[int, int]:
    """MiB per GPU index that ``held`` (each a plan's claims or a peer's) take, added up."""
    totals: dict[int, int] = {}
    for claims_mib in held:
        for index, mib in claims_mib.items():
            totals[index] = totals.get(index, 0) + mib
    return totals


def held_mib(instances: Mapping[str, Instance], claims: ClaimBook) -> dict[int, int]:
    """MiB per GPU held by the servers that run (by their plans) and by peers' llama-servers on the GPUs
    this host lends (by their claims): what simulated GPUs show as used."""
    return claims_total([*(i.placement.claims_mib for i in instances.values() if i.running), claims.claims_mib()])


class Lending:
    def __init__(
        self, instances: Mapping[str, Instance], readings: LatestReadings, gpus: GpuSettings, claims: ClaimBook
    ) -> None:
        """``instances``: this host's, all of them; ``claims``: the peers' claims on this host's GPUs."""
        self._instances = instances
        self._readings = readings
        self._gpus = gpus
        self._claims = claims

    def reconfigure(self, gpus: GpuSettings) -> None:
        """Use ``gpus`` (margins, reserve, overhead, waits) from now on: a reload."""
        self._gpus = gpus

    def claimed_mib(self, counted: Iterable[Instance], *, besides_holder: str | None = None) -> dict[int, int]:
        """MiB per GPU that the plans of the ``counted`` instances and the peers' claims (all, or all but
        ``besides_holder``'s) hold."""
        return claims_total([*(i.placement.claims_mib for i in counted), self._claims.claims_mib(besides_holder)])

    def usable_mib(self, besides_holder: str | None = None) -> dict[int, int]:
        """What a llama-server elsewhere may use of each GPU, with every claim but ``besides_holder``'s
        counted."""
        claims = self.claimed_mib((i for i in self._instances.values() if i.active), besides_holder=besides_holder)
        return {r.index: r.usable_mib for r in usable_gpus(self._readings.latest(), claims, self._gpus)}

    def endpoint_gpus(self) -> dict[str, tuple[int, ...]]:
        """Each ready rpc-server's endpoint (HOST:PORT), with the GPUs it lends."""
        return {
            address: i.placement.gpus for address, (i, _backend) in ready_rpc_servers(self._instances.values()).items()
        }

    def claim(self, request: ClaimRequest) -> list[RpcClaim]:
        """Take or renew a peer's claim (see ClaimBook.register); the claims on its endpoint after it."""
        return self._claims.register(request, self.endpoint_gpus(), self.usable_mib)

    def release(self, holder: str) -> bool:
        """Drop ``holder``'s claim; False when it held none."""
        return self._claims.release(holder)

    def report(self) -> RpcReport:
        """`GET /rpc`: each ready rpc-server with the GPUs it lends, its connections and claims."""
        return rpc_report(self._instances.values(), self._readings.latest(), self._claims, self.usable_mib())
