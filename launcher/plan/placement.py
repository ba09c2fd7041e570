"""The planner's output for a start: where a server's layers go, which GPUs it sees and what it claims.
The backend turns it into the server's command line and environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Placement:
    """Where a server's layers go. Without GPUs everything stays on the CPU."""

    gpu_layers: int = 0
    tensor_split: tuple[float, ...] = ()
    gpus: tuple[int, ...] = ()  # indices of the GPUs used, in the order the child sees them
    claims_mib: Mapping[int, int] = field(default_factory=dict)  # planned MiB per GPU index
    env: Mapping[str, str] = field(default_factory=dict)  # device visibility for the child
    rpc: tuple[str, ...] = ()  # peers' rpc-servers (HOST:PORT), whose devices come before this host's GPUs
