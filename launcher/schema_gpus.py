"""The wire types of GPUs: what is read of each at one time, and how they are joined."""

from __future__ import annotations

from pydantic import ConfigDict

from launcher.schema import WireModel


class GpuProcess(WireModel):
    model_config = ConfigDict(frozen=True, defer_build=True)

    pid: int
    used_mib: int | None


class GpuLinkReading(WireModel):
    """One NVLink (NVIDIA) or xGMI (AMD) link of a GPU at one time. None: the library does not say."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    link: int  # the link's number on its GPU
    kind: str  # nvlink | xgmi
    up: bool
    peer: str | None = None  # the GPU index at its other end, else that end's PCI bus id (an NVSwitch)
    speed_mbps: float | None = None  # the speed it runs at, MB/s
    speed_max_mbps: float | None = None  # the speed it can run at, MB/s
    tx_bytes_per_second: float | None = None
    rx_bytes_per_second: float | None = None


class GpuReading(WireModel):
    """What a backend reads of one GPU at one time. None: the backend cannot read that value."""

    model_config = ConfigDict(frozen=True, defer_build=True)

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
    pcie_tx_bytes_per_second: float | None = None
    pcie_rx_bytes_per_second: float | None = None
    links: tuple[GpuLinkReading, ...] = ()  # NVLink or xGMI; none on a GPU without them
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


class GpuLink(WireModel):
    """How two GPUs reach each other."""

    gpus: tuple[int, int]
    link: str  # nvlink | xgmi | board | switch | host-bridge | cpu | cross-cpu
    direct: bool  # peer to peer without the CPU: a split across them is fast


class GpuTopology(WireModel):
    """`GET /gpus/topology`: how the GPUs are joined, and the limits the daemon watches them against."""

    links: list[GpuLink]
    thermal_limit_c: float
    poll_interval_s: float
