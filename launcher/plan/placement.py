"""The planner's output for a start: where a server's layers go, on which of this host's GPUs (in the order
the child sees them), what it claims there, and which peers' rpc-servers it uses. The backend turns it
into the server's command line and environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from launcher.gpu.types import GpuIdentity


@dataclass(frozen=True)
class Placement:
    """Where a server's layers go. Without GPUs everything stays on the CPU."""

    gpu_layers: int = 0
    tensor_split: tuple[float, ...] = ()
    devices: tuple[GpuIdentity, ...] = ()  # this host's GPUs the child sees, in the order it sees them
    claims_mib: Mapping[int, int] = field(default_factory=dict)  # planned MiB per GPU index
    rpc: tuple[str, ...] = ()  # peers' rpc-servers (HOST:PORT), whose devices come before this host's GPUs
    ctx: int | None = None  # the context the plan chose (`ctx: max`); None: the model's configured one
    split_mode: str = "layer"  # layer | tensor (-sm)

    @property
    def gpus(self) -> tuple[int, ...]:
        """The indices of this host's GPUs used, in the order the child sees them."""
        return tuple(device.index for device in self.devices)
