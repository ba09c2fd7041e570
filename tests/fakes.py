"""Stand-ins for the GPU libraries: the real library's types and error classes, values we choose."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml

GIB = 1024**3


@dataclass
class FakeGpu:
    name: str = "NVIDIA GeForce RTX 3090"
    uuid: str = "GPU-11111111-2222-3333-4444-555555555555"
    bus_id: str = "00000000:01:00.0"
    total_bytes: int = 24 * GIB
    used_bytes: int = 6 * GIB
    temperature_c: int = 67
    util_pct: int = 93
    power_mw: int = 215_500
    limit_mw: int = 350_000
    pcie: tuple[int, int, int, int] = (4, 4, 16, 16)  # gen, max gen, width, max width
    reasons: int = 0x20 | 0x4
    processes: list[tuple[int, int | None]] = field(default_factory=list)
    nvlink_to: str | None = None  # bus id at the other end of link 0
    nvlink_up: bool = True
    nvlink_speed_mbps: int = 25_781
    # NVLink 0's data counters (KiB sent, KiB received) and their time (µs), as NVML's field values give
    nvlink_kib: tuple[int, int] = (0, 0)
    nvlink_time_us: int = 0
    pcie_kib_per_s: tuple[int, int] = (0, 0)  # TX, RX
    unsupported: set[str] = field(default_factory=set)  # function names that raise NotSupported
    lost: bool = False


class FakeNvml:
    """Answers like pynvml for the GPUs given: real structs, real NVMLError subclasses.

    ``init_error`` (an NVML_ERROR_* code) makes nvmlInit fail as pynvml does on a machine without the
    driver (NVML_ERROR_LIBRARY_NOT_FOUND) or with a broken one (NVML_ERROR_DRIVER_NOT_LOADED).
    """

    def __init__(
        self, gpus: list[FakeGpu], topology: dict[tuple[int, int], int] | None = None, *, init_error: int | None = None
    ) -> None:
        self.gpus = gpus
        self.topology = topology or {}
        self.driver_version = "550.54.15"
        self.init_error = init_error
        self.inits = 0
        self.shutdowns = 0
        for name in dir(pynvml):
            if name.startswith(("NVML_", "NVMLError", "nvmlMemory_v2")):
                setattr(self, name, getattr(pynvml, name))

    def _gpu(self, handle: int, call: str) -> FakeGpu:
        gpu = self.gpus[handle]
        if gpu.lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        if call in gpu.unsupported:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.driver_version

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return self._gpu(h, "uuid").uuid

    def nvmlDeviceGetName(self, h: int) -> str:
        return self._gpu(h, "name").name

    def nvmlDeviceGetPciInfo(self, h: int) -> Any:
        info = pynvml.nvmlPciInfo_t()
        info.busId = self._gpu(h, "pci").bus_id.encode()
        return info

    def nvmlDeviceGetMemoryInfo(self, h: int, version: int | None = None) -> Any:
        assert version == pynvml.nvmlMemory_v2, "the launcher asks for memory v2"
        gpu = self._gpu(h, "memory")
        memory = pynvml.c_nvmlMemory_v2_t()
        memory.total, memory.used, memory.free = gpu.total_bytes, gpu.used_bytes, gpu.total_bytes - gpu.used_bytes
        return memory

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._gpu(h, "temperature").temperature_c

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        rates = pynvml.c_nvmlUtilization_t()
        rates.gpu = self._gpu(h, "utilization").util_pct
        return rates

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        return self._gpu(h, "power").power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, h: int) -> int:
        return self._gpu(h, "limit").limit_mw

    def nvmlDeviceGetCurrPcieLinkGeneration(self, h: int) -> int:
        return self._gpu(h, "pcie").pcie[0]

    def nvmlDeviceGetMaxPcieLinkGeneration(self, h: int) -> int:
        return self._gpu(h, "pcie").pcie[1]

    def nvmlDeviceGetCurrPcieLinkWidth(self, h: int) -> int:
        return self._gpu(h, "pcie").pcie[2]

    def nvmlDeviceGetMaxPcieLinkWidth(self, h: int) -> int:
        return self._gpu(h, "pcie").pcie[3]

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: int) -> int:
        return self._gpu(h, "reasons").reasons

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[Any]:
        # pynvml returns friendly objects, with usedGpuMemory None where NVML says "not available".
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in self._gpu(h, "processes").processes]

    def nvmlDeviceGetTopologyCommonAncestor(self, a: int, b: int) -> int:
        if (a, b) not in self.topology:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return self.topology[(a, b)]

    def nvmlDeviceGetNvLinkState(self, h: int, link: int) -> int:
        gpu = self._gpu(h, "nvlink")
        if gpu.nvlink_to is None or link > 0:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return int(pynvml.NVML_FEATURE_ENABLED if gpu.nvlink_up else pynvml.NVML_FEATURE_DISABLED)

    def nvmlDeviceGetPcieThroughput(self, h: int, counter: int) -> int:
        tx, rx = self._gpu(h, "nvmlDeviceGetPcieThroughput").pcie_kib_per_s
        return tx if counter == pynvml.NVML_PCIE_UTIL_TX_BYTES else rx

    def nvmlDeviceGetFieldValues(self, h: int, field_ids: list[tuple[int, int]]) -> Any:
        """Real c_nvmlFieldValue_t structs: the NVLink data counters and link 0's speed; others not supported."""
        gpu = self._gpu(h, "nvmlDeviceGetFieldValues")
        values = (pynvml.c_nvmlFieldValue_t * len(field_ids))()
        known = {
            (pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, 0): gpu.nvlink_kib[0],
            (pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, 0): gpu.nvlink_kib[1],
            (pynvml.NVML_FI_DEV_NVLINK_SPEED_MBPS_L0, 0): gpu.nvlink_speed_mbps,
        }
        for value, (field_id, scope) in zip(values, field_ids, strict=True):
            value.fieldId, value.scopeId, value.timestamp = field_id, scope, gpu.nvlink_time_us
            if (field_id, scope) in known:
                value.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
                value.value.ullVal = known[(field_id, scope)]
                value.nvmlReturn = pynvml.NVML_SUCCESS
            else:
                value.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
        return values

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h: int, link: int) -> Any:
        info = pynvml.nvmlPciInfo_t()
        info.busId = (self._gpu(h, "nvlink").nvlink_to or "").encode()
        return info


class AmdSmiException(Exception):
    """amdsmi's base error (the real module cannot be imported without ROCm's library)."""


class AmdSmiLibraryException(AmdSmiException):
    def __init__(self, err_code: int) -> None:
        super().__init__(err_code)
        self.err_code = err_code


class FakeAmdSmi:
    """Answers like amdsmi does: dicts, 'N/A' for what a card does not report, AmdSmiException."""

    AmdSmiException = AmdSmiException
    AmdSmiTemperatureType = SimpleNamespace(EDGE=0, HOTSPOT=1)
    AmdSmiTemperatureMetric = SimpleNamespace(CURRENT=0)

    def __init__(self, cards: list[dict[str, Any]]) -> None:
        self.cards = cards

    def amdsmi_init(self) -> None:
        pass

    def amdsmi_shut_down(self) -> None:
        pass

    def amdsmi_get_processor_handles(self) -> list[int]:
        return list(range(len(self.cards)))

    def _card(self, h: int, key: str) -> Any:
        card = self.cards[h]
        if card.get("lost"):
            raise AmdSmiLibraryException(8)
        if key not in card:
            raise AmdSmiLibraryException(2)
        return card[key]

    def amdsmi_get_gpu_device_bdf(self, h: int) -> str:
        return str(self._card(h, "bdf"))

    def amdsmi_get_gpu_device_uuid(self, h: int) -> str:
        return str(self._card(h, "uuid"))

    def amdsmi_get_gpu_asic_info(self, h: int) -> dict[str, Any]:
        return {"market_name": self._card(h, "name"), "vendor_id": 4098}

    def amdsmi_get_gpu_vram_usage(self, h: int) -> dict[str, int]:
        return {"vram_total": self._card(h, "vram_total"), "vram_used": self._card(h, "vram_used")}

    def amdsmi_get_temp_metric(self, h: int, sensor: int, metric: int) -> int:
        return int(self._card(h, "temps")[sensor])

    def amdsmi_get_gpu_activity(self, h: int) -> dict[str, Any]:
        return {"gfx_activity": self._card(h, "gfx"), "umc_activity": "N/A", "mm_activity": "N/A"}

    def amdsmi_get_power_info(self, h: int) -> dict[str, Any]:
        return dict(self._card(h, "power"))

    def amdsmi_get_pcie_info(self, h: int) -> dict[str, Any]:
        return dict(self._card(h, "pcie"))

    def amdsmi_get_gpu_process_list(self, h: int) -> list[dict[str, Any]]:
        return list(self._card(h, "processes"))

    def amdsmi_get_gpu_metrics_info(self, h: int) -> dict[str, Any]:
        """The metrics table's xGMI part; amdsmi gives 'N/A' for a link a card does not have."""
        return dict(self._card(h, "metrics"))

    def amdsmi_topo_get_link_type(self, a: int, b: int) -> dict[str, int]:
        return dict(self._card(a, "links")[b])
