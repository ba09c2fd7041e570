"""The GPUs' settings (`gpus:`): how they are read, what of each the planner may use, and the simulated
GPUs for machines without one.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from launcher.config_fields import MEMORY_MAX_MIB, MemoryMib, NonNegative, Period, Positive, StrictSettings

HISTORY_MAX = 7 * 24 * 3600


class SimGpu(StrictSettings):
    """A simulated GPU: for machines without one (tests, CI, the demo)."""

    name: str = Field(description="The GPU's name, as a driver reports it.")
    memory_mib: Annotated[int, Field(gt=0, le=MEMORY_MAX_MIB)] = Field(description="Its memory; at most 1 PiB.")
    vendor: Literal["nvidia", "amd"] = Field(default="nvidia", description="Whose GPU it pretends to be.")
    uuid: str | None = Field(default=None, description="Its UUID; default one made from its index.")
    pci_bus_id: str | None = Field(default=None, description="Its PCI bus id; default one made from its index.")
    used_mib: MemoryMib = Field(default=0, description="Memory used by others: a display, another program.")
    temperature_c: float | Annotated[list[float], Field(min_length=1)] = Field(
        default=40.0, description="Its temperature; a list is a script: one value per reading, the last one kept."
    )
    utilization_pct: Annotated[float, Field(ge=0, le=100)] = Field(default=0.0, description="Its utilisation.")
    power_w: Annotated[float, Field(ge=0)] = Field(default=30.0, description="Its power draw.")
    power_limit_w: Annotated[float, Field(gt=0)] = Field(default=350.0, description="Its power limit.")
    pcie_gen: Annotated[int, Field(ge=1)] = Field(default=4, description="The PCIe generation its link runs at.")
    pcie_gen_max: Annotated[int, Field(ge=1)] = Field(default=4, description="The highest PCIe generation it supports.")
    pcie_width: Annotated[int, Field(ge=1)] = Field(default=16, description="The PCIe lanes its link runs on.")
    pcie_width_max: Annotated[int, Field(ge=1)] = Field(default=16, description="The most PCIe lanes it supports.")
    link_group: str | None = Field(
        default=None, description="GPUs of one group are directly linked (NVLink); others are joined through the CPU."
    )
    release_delay_s: NonNegative = Field(
        default=0.0,
        description="Memory a stopped server held comes back after this long, as on real GPUs (llama-swap issue 97).",
    )
    pcie_tx_mib_per_s: NonNegative | Annotated[list[NonNegative], Field(min_length=1)] = Field(
        default=0.0, description="What it sends over PCIe, MiB/s; a list is a script, as for `temperature_c`."
    )
    pcie_rx_mib_per_s: NonNegative | Annotated[list[NonNegative], Field(min_length=1)] = Field(
        default=0.0, description="What it receives over PCIe, MiB/s; a list is a script."
    )
    link_tx_mib_per_s: NonNegative | Annotated[list[NonNegative], Field(min_length=1)] = Field(
        default=0.0,
        description="What it sends on each of its NVLink/xGMI links (one to each GPU of its `link_group`), "
        "MiB/s; a list is a script.",
    )
    link_rx_mib_per_s: NonNegative | Annotated[list[NonNegative], Field(min_length=1)] = Field(
        default=0.0, description="What it receives on each of its links, MiB/s; a list is a script."
    )
    link_speed_mbps: Positive = Field(default=25_000.0, description="The speed its links run at, MB/s.")
    links_down: list[Annotated[int, Field(ge=0)]] = Field(
        default=[], description="Its links (numbered from 0 in the order of its group's GPUs) shown down."
    )

    @model_validator(mode="after")
    def _fits(self) -> SimGpu:
        if self.used_mib > self.memory_mib:
            raise ValueError(f"used_mib {self.used_mib} exceeds memory_mib {self.memory_mib}")
        return self


class GpuSettings(StrictSettings):
    """How the GPUs are read, and what of each the planner may use."""

    backend: Literal["auto", "nvml", "amdsmi", "sysfs", "sim", "none"] = Field(
        default="auto",
        description="How GPUs are read: `auto` tries nvml, then amdsmi, then sysfs, then none, and says why.",
    )
    poll_interval: Period = Field(default=1.0, description="Seconds between two readings of each GPU.")
    margin_mib: MemoryMib = Field(default=1024, description="Memory the planner leaves free on every GPU it uses.")
    # Not in llama.cpp's own buffer sizes, but taken from the card all the same.
    overhead_mib: MemoryMib = Field(
        default=512,
        description="The driver's share of each GPU a server uses (CUDA/ROCm runtime, cuBLAS workspace).",
    )
    reserve_mib: dict[int, MemoryMib] = Field(
        default_factory=dict, description="Memory kept back per GPU index, for what the launcher does not run."
    )
    thermal_limit_c: Positive = Field(
        default=90.0,
        description="A GPU at or above this temperature raises an event naming it and the instances on it.",
    )
    thermal_action: Literal["warn", "stop"] = Field(
        default="warn", description="What a hot GPU does to its instances: only warn, or stop them."
    )
    # Bounded: the readings are kept in memory, in a deque whose length must fit a C integer.
    history: Annotated[int, Field(ge=1, le=HISTORY_MAX)] = Field(
        default=600, description="Readings kept per GPU (10 minutes at 1 Hz); at most a week's at 1 Hz."
    )
    process_every: Annotated[int, Field(ge=1)] = Field(
        default=5, description="Per-process memory is read every Nth poll: it costs milliseconds per call."
    )
    vram_wait_s: NonNegative = Field(
        default=30.0,
        description="Before starting on GPUs a stopped server used, wait up to this long for its memory to come back.",
    )
    sim: list[SimGpu] = Field(default_factory=list, description="Simulated GPUs, for `backend: sim`.")
