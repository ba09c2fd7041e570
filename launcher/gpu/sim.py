"""Simulated GPUs, described in the configuration: memory that the launcher's instances consume, foreign
usage, scripted temperatures, and faults injected on demand (a GPU that errors, is lost, or is slow)."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator, Mapping

from launcher.config import SimGpu
from launcher.gpu.types import GpuError, GpuIdentity, Link
from launcher.schema import GpuReading

UsageSource = Callable[[], Mapping[int, int]]


def _no_usage() -> Mapping[int, int]:
    return {}


class SimBackend:
    name = "sim"

    def __init__(self, gpus: list[SimGpu]) -> None:
        self._gpus = gpus
        # MiB per GPU index that the launcher's running instances hold (set by the manager).
        self.usage: UsageSource = _no_usage
        self._temperatures: list[Iterator[float]] = [_script(g.temperature_c) for g in gpus]
        self._faults: dict[int, tuple[str | None, float]] = {}
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

    def inject(self, index: int, *, error: str | None = None, delay_s: float = 0.0) -> None:
        """Make reads of GPU ``index`` fail with ``error`` and/or take ``delay_s``; no arguments: heal it."""
        with self._lock:
            if error is None and delay_s == 0:
                self._faults.pop(index, None)
            else:
                self._faults[index] = (error, delay_s)

    def read(self, index: int, *, processes: bool) -> GpuReading:
        gpu = self._gpus[index]
        with self._lock:
            error, delay_s = self._faults.get(index, (None, 0.0))
            temperature = next(self._temperatures[index])
        if delay_s:
            time.sleep(delay_s)  # runs in the sampler's worker thread, as a slow driver call would
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
            processes=() if processes else None,
        )

    def _held(self, index: int, delay_s: float) -> int:
        """MiB our servers hold on GPU ``index``: what runs, plus what stopped less than ``delay_s`` ago."""
        now = time.monotonic()
        claimed = self.usage().get(index, 0)
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
        pass


def _script(value: float | list[float]) -> Iterator[float]:
    values = value if isinstance(value, list) else [value]
    return itertools.chain(values, itertools.repeat(values[-1]))
