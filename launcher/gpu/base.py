"""The GPU backend seam: identities once, a reading per GPU per poll, and the links between GPUs.

Implementations: nvml (NVIDIA), amdsmi (AMD, ROCm's library), sysfs (AMD without the library),
sim (simulated GPUs from the configuration) and none (no GPU: everything runs on the CPU).
"""

from __future__ import annotations

from typing import Protocol

from launcher.gpu.types import GpuIdentity, Link
from launcher.schema_gpus import GpuReading


class GpuBackend(Protocol):
    name: str

    def identities(self) -> list[GpuIdentity]:
        """Every GPU, read once when the backend opens."""
        ...

    def read(self, index: int, *, processes: bool) -> GpuReading:
        """The GPU's values now; raises GpuError (or the library's error) when it cannot be read."""
        ...

    def links(self) -> dict[tuple[int, int], Link]:
        """How each pair (i < j) is joined; pairs the backend cannot tell are left out."""
        ...

    def close(self) -> None: ...


class NoGpus:
    """No GPU backend applies: servers run on the CPU."""

    name = "none"

    def identities(self) -> list[GpuIdentity]:
        return []

    def read(self, index: int, *, processes: bool) -> GpuReading:
        raise IndexError(index)

    def links(self) -> dict[tuple[int, int], Link]:
        return {}

    def close(self) -> None:
        pass
