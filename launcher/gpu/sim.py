"""Simulated GPUs, described in the configuration: memory that the launcher's instances consume, foreign
usage, scripted temperatures, and faults injected on demand (a GPU that errors, is lost, or hangs)."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Iterator

from launcher.config_gpus import SimGpu
from launcher.gpu.types import GpuError, GpuIdentity, HeldMib, Link, nothing_held
from launcher.schema_gpus import GpuLinkReading, GpuReading

_MIB = 1024 * 1024


class Hold:
    """A hung driver call on demand: reads of a GPU given this hold wait in it until ``release()``.

    ``await hold.entered()`` returns once a read waits in it, so a test knows for certain that a read is
    under way and will not return by itself.
    """

    def __init__(self) -> None:
        self._entered = threading.Event()
        self._released = threading.Event()

    async def entered(self, timeout_s: float = 5.0) -> None:
        """Return once a read waits in the hold; TimeoutError when none does within ``timeout_s``."""
        if not await asyncio.to_thread(self._entered.wait, timeout_s):
            raise TimeoutError(f"no read entered the hold within {timeout_s:g}s")

    def release(self) -> None:
        """Let the reads waiting in the hold, and every later one, go on."""
        self._released.set()

    def wait(self) -> None:
        """Called by a read (in the sampler's worker thread): wait here until released."""
        self._entered.set()
        self._released.wait()


class SimBackend:
    name = "sim"

    def __init__(self, gpus: list[SimGpu], *, usage: HeldMib = nothing_held) -> None:
        """``usage``: MiB per GPU index that the launcher's running instances hold (what they use here)."""
        self._gpus = gpus
        self._usage = usage
        self._temperatures: list[Iterator[float]] = [_script(g.temperature_c) for g in gpus]
        # Scripted traffic, MiB/s: PCIe TX and RX, and each link's TX and RX.
        self._traffic: list[tuple[Iterator[float], ...]] = [
            tuple(
                _script(v) for v in (g.pcie_tx_mib_per_s, g.pcie_rx_mib_per_s, g.link_tx_mib_per_s, g.link_rx_mib_per_s)
            )
            for g in gpus
        ]
        self._faults: dict[int, tuple[str | None, Hold | None]] = {}
        self._lock = threading.Lock()
        self._claimed: dict[int, int] = {}  # what the usage source said last time, per GPU
        self._releasing: dict[int, list[tuple[float, int]]] = {}  # (until, MiB) still held after a stop

    def identities(self) -> list[GpuIdentity]:
        return [
            GpuIdentity(
                index=i,
                uuid=g.uuid or f"GPU-5130{i:04d}-0000-4000-8000-{i:012d}",
                name=g.name,
                pci_bus_id=g.pci_bus_id or f"00000000:{i + 1:02X}:00.0",
                vendor=g.vendor,
            )
            for i, g in enumerate(self._gpus)
        ]

    def inject(self, index: int, *, error: str | None = None, hold: Hold | None = None) -> None:
        """Make reads of GPU ``index`` wait in ``hold`` and/or fail with ``error``; no arguments: heal it.

        The fault replaced is over: a read waiting in its hold goes on.
        """
        with self._lock:
            _, previous = self._faults.pop(index, (None, None))
            if error is not None or hold is not None:
                self._faults[index] = (error, hold)
        if previous is not None and previous is not hold:
            previous.release()

    def read(self, index: int, *, processes: bool) -> GpuReading:
        gpu = self._gpus[index]
        with self._lock:
            error, hold = self._faults.get(index, (None, None))
            temperature = next(self._temperatures[index])
            pcie_tx, pcie_rx, link_tx, link_rx = (next(script) * _MIB for script in self._traffic[index])
        if hold is not None:
            hold.wait()  # runs in the sampler's worker thread, as a hung driver call would
        if error is not None:
            raise GpuError(error)
        used = min(gpu.memory_mib, gpu.used_mib + self._held(index, gpu.release_delay_s))
        return GpuReading(
            memory_total_mib=gpu.memory_mib,
            memory_used_mib=used,
            temperature_c=temperature,
            utilization_pct=gpu.utilization_pct,
            power_w=gpu.power_w,
            power_limit_w=gpu.power_limit_w,
            pcie_gen=gpu.pcie_gen,
            pcie_gen_max=gpu.pcie_gen_max,
            pcie_width=gpu.pcie_width,
            pcie_width_max=gpu.pcie_width_max,
            pcie_tx_bytes_per_second=pcie_tx,
            pcie_rx_bytes_per_second=pcie_rx,
            links=self._link_readings(index, link_tx, link_rx),
            processes=() if processes else None,
        )

    def _link_readings(self, index: int, tx: float, rx: float) -> tuple[GpuLinkReading, ...]:
        """One link to each other GPU of its link group, numbered in the group's order."""
        gpu = self._gpus[index]
        if gpu.link_group is None:
            return ()
        peers = [i for i, g in enumerate(self._gpus) if g.link_group == gpu.link_group and i != index]
        kind = "xgmi" if gpu.vendor == "amd" else "nvlink"
        result = []
        for link, peer in enumerate(peers):
            up = link not in gpu.links_down
            result.append(
                GpuLinkReading(
                    link=link,
                    kind=kind,
                    up=up,
                    peer=str(peer),
                    speed_mbps=gpu.link_speed_mbps if up else None,
                    speed_max_mbps=gpu.link_speed_mbps,
                    tx_bytes_per_second=tx if up else 0.0,
                    rx_bytes_per_second=rx if up else 0.0,
                )
            )
        return tuple(result)

    def _held(self, index: int, delay_s: float) -> int:
        """MiB our servers hold on GPU ``index``: what runs, plus what stopped less than ``delay_s`` ago."""
        now = time.monotonic()
        claimed = self._usage().get(index, 0)
        with self._lock:
            dropped = self._claimed.get(index, 0) - claimed
            self._claimed[index] = claimed
            pending = [(until, mib) for until, mib in self._releasing.get(index, []) if until > now]
            if dropped > 0 and delay_s > 0:
                pending.append((now + delay_s, dropped))
            self._releasing[index] = pending
        return claimed + sum(mib for _, mib in pending)

    def links(self) -> dict[tuple[int, int], Link]:
        result = {}
        for (i, a), (j, b) in itertools.combinations(enumerate(self._gpus), 2):
            same = a.link_group is not None and a.link_group == b.link_group
            result[(i, j)] = Link.NVLINK if same else Link.CPU
        return result

    def close(self) -> None:
        """Heal every GPU: no read stays waiting in a hold (it would keep its worker thread forever)."""
        with self._lock:
            faulty = list(self._faults)
        for index in faulty:
            self.inject(index)


def _script(value: float | list[float]) -> Iterator[float]:
    values = value if isinstance(value, list) else [value]
    return itertools.chain(values, itertools.repeat(values[-1]))
