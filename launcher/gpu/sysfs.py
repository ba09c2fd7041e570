"""AMD GPUs from the amdgpu driver's sysfs files, for machines without ROCm's amdsmi library."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from launcher.gpu.types import GpuError, GpuIdentity, Link
from launcher.schema_gpus import GpuReading

AMD_VENDOR_ID = "0x1002"
_MIB = 1024 * 1024
# PCIe generation by transfer rate (GT/s): what `current_link_speed` says ("16.0 GT/s PCIe").
_GEN_BY_GTS = {2.5: 1, 5.0: 2, 8.0: 3, 16.0: 4, 32.0: 5, 64.0: 6}


def pcie_gen(rate_gts: float | None) -> int | None:
    if rate_gts is None:
        return None
    return _GEN_BY_GTS.get(round(rate_gts, 1))


def rocr_id(device_dir: Path) -> str | None:
    """The id ROCm's ROCR_VISIBLE_DEVICES accepts for this card ('GPU-' + the driver's unique_id)."""
    unique = _read(device_dir / "unique_id")
    return f"GPU-{unique}" if unique else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _number(path: Path) -> int | None:
    text = _read(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _rate(path: Path) -> float | None:
    text = _read(path)
    found = re.match(r"([\d.]+)\s*GT/s", text or "")
    return float(found.group(1)) if found else None


def amd_cards(root: Path) -> list[Path]:
    """The device folders of AMD cards under /sys/class/drm, in card order."""
    cards = [p for p in root.glob("card[0-9]*") if re.fullmatch(r"card\d+", p.name)]
    cards.sort(key=lambda p: int(p.name[4:]))
    return [p / "device" for p in cards if _read(p / "device" / "vendor") == AMD_VENDOR_ID]


class SysfsBackend:
    name = "sysfs"

    def __init__(self, root: Path = Path("/sys/class/drm")) -> None:
        self._devices = amd_cards(root)
        self._identities = [self._identity(i, d) for i, d in enumerate(self._devices)]

    def _identity(self, index: int, device: Path) -> GpuIdentity:
        bus_id = device.resolve().name if device.exists() else None
        product = _read(device / "product_name") or f"AMD GPU {_read(device / 'device') or ''}".strip()
        return GpuIdentity(
            index=index,
            uuid=rocr_id(device) or f"amd-{bus_id or index}",
            name=product,
            pci_bus_id=bus_id,
            vendor="amd",
        )

    def identities(self) -> list[GpuIdentity]:
        return list(self._identities)

    def _hwmon(self, device: Path) -> Path | None:
        return next(iter(sorted((device / "hwmon").glob("hwmon*"))), None)

    def read(self, index: int, *, processes: bool) -> GpuReading:
        device = self._devices[index]
        total, used = _number(device / "mem_info_vram_total"), _number(device / "mem_info_vram_used")
        if total is None or used is None:
            raise GpuError(f"cannot read {device}/mem_info_vram_*: is the card still there?")
        hwmon = self._hwmon(device)
        temps: dict[str, float] = {}
        power_w = limit_w = None
        if hwmon is not None:
            for sensor in hwmon.glob("temp*_input"):
                label = _read(sensor.with_name(sensor.name.replace("_input", "_label"))) or "edge"
                value = _number(sensor)
                if value is not None:
                    temps[label] = value / 1000
            power_uw = _number(hwmon / "power1_average") or _number(hwmon / "power1_input")
            cap_uw = _number(hwmon / "power1_cap")
            power_w = power_uw / 1e6 if power_uw is not None else None
            limit_w = cap_uw / 1e6 if cap_uw is not None else None
        busy = _number(device / "gpu_busy_percent")
        return GpuReading(
            memory_total_mib=total // _MIB,
            memory_used_mib=used // _MIB,
            temperature_c=temps.get("edge"),
            temperature_hotspot_c=temps.get("junction"),
            utilization_pct=float(busy) if busy is not None else None,
            power_w=power_w,
            power_limit_w=limit_w,
            pcie_gen=pcie_gen(_rate(device / "current_link_speed")),
            pcie_gen_max=pcie_gen(_rate(device / "max_link_speed")),
            pcie_width=_number(device / "current_link_width"),
            pcie_width_max=_number(device / "max_link_width"),
            processes=() if processes else None,  # per-process VRAM needs amdsmi
        )

    def links(self) -> dict[tuple[int, int], Link]:
        # sysfs does not say whether two cards share a switch or an Infinity Fabric link; the NUMA node
        # tells at least whether they hang off the same CPU.
        nodes = [_number(d / "numa_node") for d in self._devices]
        return {
            (i, j): Link.CPU if nodes[i] == nodes[j] or -1 in (nodes[i], nodes[j]) else Link.CROSS_CPU
            for i, j in itertools.combinations(range(len(self._devices)), 2)
        }

    def close(self) -> None:
        pass
