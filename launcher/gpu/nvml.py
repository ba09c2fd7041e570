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

from launcher.gpu.types import GpuError, GpuIdentity, Link
from launcher.schema import GpuProcess, GpuReading

_MIB = 1024 * 1024
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
            throttle=tuple(name for bit, name in _THROTTLE_BITS.items() if reasons & bit),
            processes=procs,
        )

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


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _describe(exc: Exception) -> str:
    return f"NVML: {exc}"
