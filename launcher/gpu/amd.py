"""AMD GPUs through ROCm's amdsmi library.

`import amdsmi` raises KeyError (not ImportError) when ROCm's libamd_smi.so is missing, so opening this
backend treats any exception as "not available". Values the library marks "N/A" become None.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import itertools
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from launcher.gpu.rates import Count, Rates
from launcher.gpu.sysfs import pcie_gen, rocr_id
from launcher.gpu.types import GpuError, GpuIdentity, Link
from launcher.schema_gpus import GpuLinkReading, GpuProcess, GpuReading

_MIB = 1024 * 1024
_XGMI = 2  # AMDSMI_LINK_TYPE_XGMI: Infinity Fabric between GPUs
T = TypeVar("T")


def _import_amdsmi() -> ModuleType:
    # Without ROCm, the package prints its own complaint on stdout before raising: keep it out of ours.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return importlib.import_module("amdsmi")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class AmdSmiBackend:
    name = "amdsmi"

    def __init__(self, lib: Any = None, pci_root: Path = Path("/sys/bus/pci/devices")) -> None:
        self._amd = lib if lib is not None else _import_amdsmi()
        self._amd.amdsmi_init()
        self._handles = list(self._amd.amdsmi_get_processor_handles())
        self._pci_root = pci_root
        self._identities = [self._identity(i, h) for i, h in enumerate(self._handles)]
        self._rates = Rates()

    def _identity(self, index: int, handle: Any) -> GpuIdentity:
        amd = self._amd
        bdf = self._optional(lambda: str(amd.amdsmi_get_gpu_device_bdf(handle)))
        asic = self._optional(lambda: amd.amdsmi_get_gpu_asic_info(handle)) or {}
        # ROCR_VISIBLE_DEVICES takes 'GPU-<unique_id>'; amdsmi's own uuid is the fallback.
        uuid = (rocr_id(self._pci_root / bdf) if bdf else None) or str(amd.amdsmi_get_gpu_device_uuid(handle))
        return GpuIdentity(
            index=index,
            uuid=uuid,
            name=str(asic.get("market_name") or "AMD GPU"),
            pci_bus_id=bdf,
            vendor="amd",
        )

    def identities(self) -> list[GpuIdentity]:
        return list(self._identities)

    def _optional(self, call: Callable[[], T]) -> T | None:
        try:
            return call()
        except self._amd.AmdSmiException:
            return None

    def read(self, index: int, *, processes: bool) -> GpuReading:
        amd, h = self._amd, self._handles[index]
        try:
            vram = amd.amdsmi_get_gpu_vram_usage(h)
        except amd.AmdSmiException as exc:
            raise GpuError(f"amdsmi: {exc}") from None
        temp_type, metric = amd.AmdSmiTemperatureType, amd.AmdSmiTemperatureMetric.CURRENT
        edge = self._optional(lambda: amd.amdsmi_get_temp_metric(h, temp_type.EDGE, metric))
        hotspot = self._optional(lambda: amd.amdsmi_get_temp_metric(h, temp_type.HOTSPOT, metric))
        activity = self._optional(lambda: amd.amdsmi_get_gpu_activity(h)) or {}
        power = self._optional(lambda: amd.amdsmi_get_power_info(h)) or {}
        pcie = self._optional(lambda: amd.amdsmi_get_pcie_info(h)) or {}
        static, current = pcie.get("pcie_static", {}), pcie.get("pcie_metric", {})
        speed = _number(current.get("pcie_speed"))  # MT/s
        socket_w = _number(power.get("current_socket_power")) or _number(power.get("average_socket_power"))
        procs = None
        if processes:
            procs = tuple(_processes(self._optional(lambda: amd.amdsmi_get_gpu_process_list(h)) or []))
        return GpuReading(
            memory_total_mib=int(vram["vram_total"]),
            memory_used_mib=int(vram["vram_used"]),
            temperature_c=_number(edge),
            temperature_hotspot_c=_number(hotspot),
            utilization_pct=_number(activity.get("gfx_activity")),
            power_w=socket_w,
            power_limit_w=_number(power.get("power_limit")),
            pcie_gen=pcie_gen(speed / 1000) if speed is not None else None,
            pcie_gen_max=_int(static.get("pcie_interface_version")),
            pcie_width=_int(current.get("pcie_width")),
            pcie_width_max=_int(static.get("max_pcie_width")),
            links=self._xgmi(index, h),
            processes=procs,
        )

    def _xgmi(self, index: int, h: Any) -> tuple[GpuLinkReading, ...]:
        """The xGMI links from the GPU's metrics table: per link, data read and written (KB counters, made
        rates here) and the speed all links run at (Gb/s). A link whose counters read 'N/A' is not there.
        PCIe TX/RX is not read on AMD: amdsmi_get_gpu_pci_throughput measures for a whole second per call."""
        table = self._optional(lambda: self._amd.amdsmi_get_gpu_metrics_info(h)) or {}
        reads, writes = table.get("xgmi_read_data_acc"), table.get("xgmi_write_data_acc")
        if not isinstance(reads, list) or not isinstance(writes, list):
            return ()
        speed_gbps = _number(table.get("xgmi_link_speed"))
        now = time.monotonic()
        result = []
        for link, (read_kb, written_kb) in enumerate(zip(reads, writes, strict=False)):
            if _number(read_kb) is None or _number(written_kb) is None:
                continue
            result.append(
                GpuLinkReading(
                    link=link,
                    kind="xgmi",
                    up=True,
                    speed_mbps=speed_gbps * 125 if speed_gbps is not None else None,
                    tx_bytes_per_second=self._rates.rate((index, link, "tx"), Count(float(written_kb) * 1000, now)),
                    rx_bytes_per_second=self._rates.rate((index, link, "rx"), Count(float(read_kb) * 1000, now)),
                )
            )
        return tuple(result)

    def links(self) -> dict[tuple[int, int], Link]:
        result = {}
        for (i, a), (j, b) in itertools.combinations(enumerate(self._handles), 2):
            info = self._optional(lambda a=a, b=b: self._amd.amdsmi_topo_get_link_type(a, b)) or {}  # type: ignore[misc]
            if info.get("type") == _XGMI:
                result[(i, j)] = Link.XGMI
            elif info.get("hops") is not None:
                result[(i, j)] = Link.SWITCH if info["hops"] <= 2 else Link.CPU
        return result

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._amd.amdsmi_shut_down()


def _int(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None else None


def _processes(procs: list[Any]) -> list[GpuProcess]:
    result = []
    for p in procs:
        if not isinstance(p, dict) or "pid" not in p:
            continue
        vram = (p.get("memory_usage") or {}).get("vram_mem")
        result.append(GpuProcess(pid=int(p["pid"]), used_mib=int(vram) // _MIB if isinstance(vram, int) else None))
    return result
