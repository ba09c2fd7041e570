"""NVIDIA GPUs through NVML (package nvidia-ml-py, module pynvml).

NVML is initialised once (init can take seconds without persistence mode) and handles are cached. Every
call that a GPU or driver may not support is read on its own, so one unsupported value does not hide
the rest; errors that mean the GPU is gone are raised for the sampler to record.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
from collections.abc import Callable
from functools import partial
from types import ModuleType
from typing import Any, TypeVar

from launcher.gpu.rates import Count, Rates
from launcher.gpu.types import GpuError, GpuIdentity, Link
from launcher.schema_gpus import GpuLinkReading, GpuProcess, GpuReading

_MIB = 1024 * 1024
_KIB = 1024  # NVML's PCIe throughput is in KB/s and its NVLink counters in KiB: both 1024 bytes
T = TypeVar("T")

# nvmlDeviceGetCurrentClocksEventReasons bits worth telling a user about.
_THROTTLE_BITS = {
    0x4: "power-cap",
    0x8: "hw-slowdown",
    0x20: "sw-thermal",
    0x40: "hw-thermal",
    0x80: "power-brake",
}


def _load() -> ModuleType:
    return importlib.import_module("pynvml")


class NvmlBackend:
    name = "nvml"

    def __init__(self, lib: Any = None) -> None:
        """Initialise NVML; raises (the library's error) when there is no driver or no library."""
        self._nv = lib if lib is not None else _load()
        self._nv.nvmlInit()
        count = self._nv.nvmlDeviceGetCount()
        self._handles = [self._nv.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        driver = self._optional(self._nv.nvmlSystemGetDriverVersion)
        self._driver = _text(driver) if driver is not None else None
        self._identities = [self._identity(i, h) for i, h in enumerate(self._handles)]
        self._topology_levels = {
            self._nv.NVML_TOPOLOGY_INTERNAL: Link.BOARD,
            self._nv.NVML_TOPOLOGY_SINGLE: Link.SWITCH,
            self._nv.NVML_TOPOLOGY_MULTIPLE: Link.SWITCH,
            self._nv.NVML_TOPOLOGY_HOSTBRIDGE: Link.HOST_BRIDGE,
            self._nv.NVML_TOPOLOGY_NODE: Link.CPU,
            self._nv.NVML_TOPOLOGY_SYSTEM: Link.CROSS_CPU,
        }
        self._bus_ids = {(g.pci_bus_id or "").lower(): g.index for g in self._identities}
        self._rates = Rates()

    def _identity(self, index: int, handle: Any) -> GpuIdentity:
        pci = self._optional(lambda: self._nv.nvmlDeviceGetPciInfo(handle))
        return GpuIdentity(
            index=index,
            uuid=_text(self._nv.nvmlDeviceGetUUID(handle)),
            name=_text(self._nv.nvmlDeviceGetName(handle)),
            pci_bus_id=_text(pci.busId) if pci is not None else None,
            vendor="nvidia",
            driver=self._driver,
        )

    def identities(self) -> list[GpuIdentity]:
        return list(self._identities)

    def _optional(self, call: Callable[[], T]) -> T | None:
        """The value, or None where this GPU or driver does not offer it. A lost GPU still raises."""
        try:
            return call()
        except self._nv.NVMLError as exc:
            if isinstance(exc, self._nv.NVMLError_GpuIsLost | self._nv.NVMLError_Uninitialized):
                raise GpuError(_describe(exc)) from None
            return None

    def read(self, index: int, *, processes: bool) -> GpuReading:
        nv, h = self._nv, self._handles[index]
        try:
            memory = nv.nvmlDeviceGetMemoryInfo(h, version=nv.nvmlMemory_v2)
        except nv.NVMLError as exc:
            raise GpuError(_describe(exc)) from None
        util = self._optional(lambda: nv.nvmlDeviceGetUtilizationRates(h))
        power_mw = self._optional(lambda: nv.nvmlDeviceGetPowerUsage(h))
        limit_mw = self._optional(lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h))
        reasons = self._optional(lambda: nv.nvmlDeviceGetCurrentClocksEventReasons(h)) or 0
        procs = None
        if processes:
            procs = tuple(_processes(self._optional(partial(nv.nvmlDeviceGetComputeRunningProcesses, h)) or []))
        return GpuReading(
            memory_total_mib=memory.total // _MIB,
            memory_used_mib=memory.used // _MIB,
            temperature_c=self._optional(lambda: float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))),
            utilization_pct=float(util.gpu) if util is not None else None,
            power_w=power_mw / 1000 if power_mw is not None else None,
            power_limit_w=limit_mw / 1000 if limit_mw is not None else None,
            pcie_gen=self._optional(lambda: nv.nvmlDeviceGetCurrPcieLinkGeneration(h)),
            pcie_gen_max=self._optional(lambda: nv.nvmlDeviceGetMaxPcieLinkGeneration(h)),
            pcie_width=self._optional(lambda: nv.nvmlDeviceGetCurrPcieLinkWidth(h)),
            pcie_width_max=self._optional(lambda: nv.nvmlDeviceGetMaxPcieLinkWidth(h)),
            pcie_tx_bytes_per_second=self._pcie(h, nv.NVML_PCIE_UTIL_TX_BYTES),
            pcie_rx_bytes_per_second=self._pcie(h, nv.NVML_PCIE_UTIL_RX_BYTES),
            links=self._nvlinks(index, h),
            throttle=tuple(name for bit, name in _THROTTLE_BITS.items() if reasons & bit),
            processes=procs,
        )

    def _pcie(self, h: Any, counter: int) -> float | None:
        kib_per_s = self._optional(lambda: self._nv.nvmlDeviceGetPcieThroughput(h, counter))
        return None if kib_per_s is None else float(kib_per_s * _KIB)

    def _nvlinks(self, index: int, h: Any) -> tuple[GpuLinkReading, ...]:
        """Each NVLink of the GPU: state, peer and speed, and its data counters turned into rates. A link
        number the GPU does not have answers NotSupported and is left out."""
        nv = self._nv
        states = {
            link: state
            for link in range(nv.NVML_NVLINK_MAX_LINKS)
            if (state := self._optional(partial(nv.nvmlDeviceGetNvLinkState, h, link))) is not None
        }
        if not states:
            return ()
        fields: list[tuple[int, int]] = []
        for link in states:
            speed = getattr(nv, f"NVML_FI_DEV_NVLINK_SPEED_MBPS_L{link}", nv.NVML_FI_DEV_NVLINK_SPEED_MBPS_COMMON)
            fields += [
                (nv.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, link),
                (nv.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, link),
            ]
            fields.append((speed, link))
        values = self._optional(lambda: nv.nvmlDeviceGetFieldValues(h, fields)) or []
        read = {
            (v.fieldId, v.scopeId): (float(v.value.ullVal), v.timestamp / 1e6)
            for v in values
            if v.nvmlReturn == nv.NVML_SUCCESS
        }
        result = []
        for position, (link, state) in enumerate(states.items()):
            tx, rx, speed = (read.get(field) for field in fields[3 * position : 3 * position + 3])
            remote = self._optional(partial(nv.nvmlDeviceGetNvLinkRemotePciInfo, h, link)) if state == 1 else None
            peer = _text(remote.busId) if remote is not None else None
            result.append(
                GpuLinkReading(
                    link=link,
                    kind="nvlink",
                    up=state == 1,
                    peer=str(self._bus_ids[peer.lower()]) if peer and peer.lower() in self._bus_ids else peer,
                    speed_mbps=speed[0] if speed is not None else None,
                    tx_bytes_per_second=self._rates.rate((index, link, "tx"), _count(tx)),
                    rx_bytes_per_second=self._rates.rate((index, link, "rx"), _count(rx)),
                )
            )
        return tuple(result)

    def links(self) -> dict[tuple[int, int], Link]:
        result = {}
        for (i, a), (j, b) in itertools.combinations(enumerate(self._handles), 2):
            if self._nvlinked(a, b):
                result[(i, j)] = Link.NVLINK
                continue
            level = self._optional(partial(self._nv.nvmlDeviceGetTopologyCommonAncestor, a, b))
            if level in self._topology_levels:
                result[(i, j)] = self._topology_levels[level]
        return result

    def _nvlinked(self, a: Any, b: Any) -> bool:
        """True when an active NVLink of ``a`` ends at ``b``'s PCI bus id."""
        target = self._optional(lambda: self._nv.nvmlDeviceGetPciInfo(b))
        if target is None:
            return False
        for link in range(self._nv.NVML_NVLINK_MAX_LINKS):
            if self._optional(partial(self._nv.nvmlDeviceGetNvLinkState, a, link)) != 1:
                continue
            remote = self._optional(partial(self._nv.nvmlDeviceGetNvLinkRemotePciInfo, a, link))
            if remote is not None and _text(remote.busId).lower() == _text(target.busId).lower():
                return True
        return False

    def close(self) -> None:
        with contextlib.suppress(self._nv.NVMLError):
            self._nv.nvmlShutdown()


def _processes(procs: list[Any]) -> list[GpuProcess]:
    result = []
    for p in procs:
        used = p.usedGpuMemory  # None when the driver hides it (no permission, MIG, ...)
        result.append(GpuProcess(pid=int(p.pid), used_mib=int(used) // _MIB if isinstance(used, int) else None))
    return result


def _count(read: tuple[float, float] | None) -> Count | None:
    """A counter field in KiB with its time (seconds) as a count of bytes."""
    return None if read is None else Count(read[0] * _KIB, read[1])


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _describe(exc: Exception) -> str:
    return f"NVML: {exc}"
