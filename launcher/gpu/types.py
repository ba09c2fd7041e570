"""What the launcher knows about a GPU: identity, one reading, and how two GPUs are joined.

Values carry their units in their names (MiB, °C, %, W); None means the backend cannot read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, ConfigDict


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


class GpuProcess(BaseModel):
    model_config = ConfigDict(frozen=True)

    pid: int
    used_mib: int | None


class GpuReading(BaseModel):
    """What a backend reads of one GPU at one time."""

    model_config = ConfigDict(frozen=True)

    memory_total_mib: int | None = None
    memory_used_mib: int | None = None
    temperature_c: float | None = None
    temperature_hotspot_c: float | None = None
    utilization_pct: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    pcie_gen: int | None = None
    pcie_gen_max: int | None = None
    pcie_width: int | None = None
    pcie_width_max: int | None = None
    throttle: tuple[str, ...] = ()
    processes: tuple[GpuProcess, ...] | None = None  # None: not read this time


class GpuSample(GpuReading):
    """One GPU at one time, as the API, the CLI and the planner see it: its identity and reading."""

    index: int
    uuid: str
    name: str
    pci_bus_id: str | None
    vendor: str
    time: float  # seconds since the epoch
    memory_free_mib: int | None = None
    instances: list[str] = []
    error: str | None = None

    @classmethod
    def of(cls, identity: GpuIdentity, reading: GpuReading | None, now: float, error: str | None = None) -> GpuSample:
        values = reading.model_dump() if reading is not None else {}
        total, used = values.get("memory_total_mib"), values.get("memory_used_mib")
        return cls(
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
