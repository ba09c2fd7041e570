"""The parts of the daemon every instance uses, handed over when it is made."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import httpx

from launcher.schema_gpus import GpuProcess
from launcher.schema_instances import Event
from launcher.schema_plans import Plan
from launcher.statedir.layout import StateDir
from launcher.supervise import drain
from launcher.supervise.leftovers import ChildRegistry
from launcher.supervise.measuring import Measuring
from launcher.supervise.slot_store import SlotStore
from launcher.supervise.vram import VramGate
from launcher.supervise.writes import StateWrites


class BlockedCheck(Protocol):
    """Asked when instance ``name``'s server ended: why it cannot run now (a peer's rpc-server its ``plan``
    uses is away), or None. Such an exit holds the instance degraded instead of going through the restart
    policy."""

    async def blocked(self, name: str, plan: Plan | None) -> str | None: ...


@dataclass(frozen=True)
class DaemonParts:
    """The parts of the daemon every instance uses, handed over when it is made."""

    http: httpx.AsyncClient
    state_dir: StateDir
    registry: ChildRegistry
    log_max_bytes: int
    log_keep: int
    # A spawn waits at it for the memory its plan claims; a server that ended tells it what it held.
    vram: VramGate
    on_event: Callable[[Event], None]
    # Failed writes to the state directory, counted daemon-wide (see writes.py).
    writes: StateWrites
    # The front door's requests in flight on each instance, which a planned stop waits for (drain.py).
    requests: drain.InFlight
    # None: no peers, so nothing outside this host can keep a server from running.
    blocked: BlockedCheck | None = None
    # What a ready server measured is kept here for the next plan (None: not kept).
    measuring: Measuring | None = None
    # The processes on these GPUs and what each holds, read now (None: no GPU reading of processes).
    gpu_processes: Callable[[Sequence[int]], Awaitable[Mapping[int, tuple[GpuProcess, ...] | None]]] | None = None
    # Where llama-servers save their slots' prompt caches at a planned stop; None: they save none.
    slot_store: SlotStore | None = None
