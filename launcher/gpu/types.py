"""What the launcher knows about a GPU: its identity and how two GPUs are joined. The readings
themselves are wire types (launcher.schema_gpus): the API and the CLI show them as read."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from launcher.schema_gpus import GpuReading, GpuSample


class GpuError(Exception):
    """A GPU could not be read; the message says why (the sampler keeps retrying)."""


class Link(StrEnum):
    """How two GPUs reach each other, nearest first (NVML's topology levels, plus NVLink)."""

    NVLINK = "nvlink"
    XGMI = "xgmi"  # AMD Infinity Fabric between GPUs
    BOARD = "board"  # same board (NVML_TOPOLOGY_INTERNAL)
    SWITCH = "switch"  # through one or several PCIe switches
    HOST_BRIDGE = "host-bridge"  # through the CPU's host bridge
    CPU = "cpu"  # through the CPU, same NUMA node
    CROSS_CPU = "cross-cpu"  # across CPU sockets (SMP interconnect)

    @property
    def direct(self) -> bool:
        """Peer-to-peer without the CPU: a tensor split across such GPUs is fast."""
        return self in (Link.NVLINK, Link.XGMI, Link.BOARD, Link.SWITCH)


@dataclass(frozen=True)
class GpuIdentity:
    index: int
    uuid: str
    name: str
    pci_bus_id: str | None
    vendor: str  # nvidia | amd
    driver: str | None = None  # the driver's version, where the library says (the driver's share is learned per it)


def sample_of(identity: GpuIdentity, reading: GpuReading | None, now: float, error: str | None = None) -> GpuSample:
    """The sample of ``identity`` from one ``reading`` (None when the read failed with ``error``)."""
    values = reading.model_dump() if reading is not None else {}
    total, used = values.get("memory_total_mib"), values.get("memory_used_mib")
    return GpuSample(
        index=identity.index,
        uuid=identity.uuid,
        name=identity.name,
        pci_bus_id=identity.pci_bus_id,
        vendor=identity.vendor,
        time=now,
        memory_free_mib=total - used if total is not None and used is not None else None,
        error=error,
        **values,
    )


# MiB per GPU index that the launcher's servers hold: what simulated GPUs show as used.
HeldMib = Callable[[], Mapping[int, int]]


def nothing_held() -> Mapping[int, int]:
    return {}
