"""The server seam: argv and environment from a model and its placement, and a readiness probe."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx

from launcher.config import ModelSettings

# Variables that belong to the daemon's own relationship with systemd, never to a child: a child that
# inherits NOTIFY_SOCKET can tell systemd the daemon is ready or stopping.
_DAEMON_ONLY_ENV = (
    "NOTIFY_SOCKET",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)


@dataclass(frozen=True)
class Placement:
    """Where a server's layers go. Without GPUs everything stays on the CPU."""

    gpu_layers: int = 0
    tensor_split: tuple[float, ...] = ()
    gpus: tuple[int, ...] = ()  # indices of the GPUs used, in the order the child sees them
    claims_mib: Mapping[int, int] = field(default_factory=dict)  # planned MiB per GPU index
    env: Mapping[str, str] = field(default_factory=dict)  # device visibility for the child


@dataclass(frozen=True)
class LaunchSpec:
    argv: list[str]
    env: dict[str, str]  # the child's whole environment


class ServerBackend(Protocol):
    name: str

    def binary(self, model: ModelSettings) -> Path:
        """The executable to run; raises ConfigError when there is none."""
        ...

    def launch_spec(self, model: ModelSettings, port: int, placement: Placement) -> LaunchSpec: ...

    async def is_ready(self, client: httpx.AsyncClient, port: int, timeout_s: float) -> bool:
        """True when the server answers that it can serve requests."""
        ...


def child_environment(*layers: Mapping[str, str]) -> dict[str, str]:
    """The daemon's environment less what belongs to the daemon alone, with ``layers`` applied in order."""
    env = {k: v for k, v in os.environ.items() if k not in _DAEMON_ONLY_ENV}
    for layer in layers:
        env.update(layer)
    return env
