"""The GPU backends against the real driver libraries, on a machine that has them: what NVML reports must
agree with nvidia-smi, and what amdsmi reports with the amdgpu driver's sysfs files. Skipped, saying why,
where the driver or the tool is missing."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import pynvml
import pytest

from launcher.config_gpus import GpuSettings
from launcher.gpu import open_backend
from launcher.gpu.amd import AmdSmiBackend
from launcher.gpu.nvml import NvmlBackend
from launcher.gpu.sysfs import SysfsBackend

PCI_BUS_ID = re.compile(r"[0-9A-Fa-f]{8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-9A-Fa-f]")


Backend = TypeVar("Backend", NvmlBackend, AmdSmiBackend)


def opened(opener: Callable[[], Backend], fails: type[Exception], missing: str, vendor: str) -> Iterator[Backend]:
    """The backend, open while the tests use it; the tests are skipped, saying why, where it cannot open
    (``fails``: what its library raises then) or sees no GPU."""
    try:
        backend = opener()
    except fails as exc:
        pytest.skip(f"no {missing}: {type(exc).__name__}: {exc}")
    if not backend.identities():
        backend.close()
        pytest.skip(f"no {vendor} GPU: {backend.name} opens but sees none")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def nvidia() -> Iterator[NvmlBackend]:
    yield from opened(NvmlBackend, pynvml.NVMLError, "NVIDIA driver (NVML cannot initialise)", "NVIDIA")


@dataclass(frozen=True)
class SmiGpu:
    uuid: str
    name: str
    pci_bus_id: str
    total_mib: int
    used_mib: int


def nvidia_smi() -> dict[str, SmiGpu]:
    """nvidia-smi's view of every GPU, by UUID."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        pytest.skip("no nvidia-smi on PATH to compare NVML's readings with")
    query = "--query-gpu=uuid,pci.bus_id,memory.total,memory.used,name"  # the name last: it may hold commas
    out = subprocess.run(
        [tool, query, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    gpus = {}
    for line in out.strip().splitlines():
        uuid, bus_id, total, used, name = (field.strip() for field in line.split(",", 4))
        gpus[uuid] = SmiGpu(uuid, name, bus_id, int(total), int(used))
    return gpus


def test_every_nvidia_gpu_has_an_identity(nvidia: NvmlBackend) -> None:
    identities = nvidia.identities()
    assert [g.index for g in identities] == list(range(len(identities)))
    assert len({g.uuid for g in identities}) == len(identities)
    for gpu in identities:
        assert gpu.vendor == "nvidia"
        assert gpu.uuid.startswith("GPU-"), gpu
        assert gpu.name, gpu
        assert gpu.pci_bus_id is not None and PCI_BUS_ID.fullmatch(gpu.pci_bus_id), gpu
    smi = nvidia_smi()
    assert {g.uuid: (g.name, (g.pci_bus_id or "").upper()) for g in identities} == {
        g.uuid: (g.name, g.pci_bus_id.upper()) for g in smi.values()
    }


def test_nvml_memory_agrees_with_nvidia_smi(nvidia: NvmlBackend) -> None:
    # Memory in use may move while we look: read nvidia-smi before and after, and NVML in between.
    before = nvidia_smi()
    readings = {g.uuid: nvidia.read(g.index, processes=False) for g in nvidia.identities()}
    after = nvidia_smi()
    for uuid, reading in readings.items():
        total, used = reading.memory_total_mib, reading.memory_used_mib
        assert total is not None and used is not None, (uuid, reading)
        slack = max(16, before[uuid].total_mib // 100)  # a few MiB, or 1 % (the driver's reserve may count)
        assert abs(total - before[uuid].total_mib) <= slack, (uuid, total, before[uuid])
        low = min(before[uuid].used_mib, after[uuid].used_mib) - slack
        high = max(before[uuid].used_mib, after[uuid].used_mib) + slack
        assert low <= used <= high, (uuid, used, before[uuid], after[uuid])
        assert 0 <= used <= total


def test_nvml_reads_temperature_power_and_processes(nvidia: NvmlBackend) -> None:
    for gpu in nvidia.identities():
        reading = nvidia.read(gpu.index, processes=True)
        assert reading.temperature_c is not None and 0 < reading.temperature_c < 120, (gpu, reading)
        assert reading.power_w is not None and reading.power_w > 0, (gpu, reading)
        assert reading.processes is not None  # a tuple, empty where the driver hides other users' processes


def dmon_pcie_mb_s() -> dict[int, list[tuple[float, float]]]:
    """`nvidia-smi dmon -s t`: per GPU index, (TX, RX) PCIe MB/s for each of 3 one-second samples."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        pytest.skip("no nvidia-smi on PATH to compare NVML's PCIe throughput with")
    out = subprocess.run([tool, "dmon", "-s", "t", "-c", "3"], capture_output=True, text=True, timeout=60).stdout
    header = next(line.lstrip("#").split() for line in out.splitlines() if line.startswith("# gpu"))
    tx, rx = header.index("txpci"), header.index("rxpci")
    samples: dict[int, list[tuple[float, float]]] = {}
    for line in out.splitlines():
        fields = line.split()
        if line.startswith("#") or len(fields) < len(header) or "-" in (fields[tx], fields[rx]):
            continue
        samples.setdefault(int(fields[0]), []).append((float(fields[tx]), float(fields[rx])))
    return samples


def test_nvml_pcie_throughput_agrees_with_dmon(nvidia: NvmlBackend) -> None:
    """Both read NVML's PCIe counters; an idle GPU moves little, so NVML's figure (its own 20 ms window)
    must lie within dmon's range over 3 s, give or take 100 MB/s of bursts."""
    before = dmon_pcie_mb_s()
    readings = {g.index: nvidia.read(g.index, processes=False) for g in nvidia.identities()}
    after = dmon_pcie_mb_s()
    for index, reading in readings.items():
        assert reading.pcie_tx_bytes_per_second is not None and reading.pcie_rx_bytes_per_second is not None
        seen = before.get(index, []) + after.get(index, [])
        if not seen:
            pytest.skip(f"nvidia-smi dmon -s t shows no PCIe figures for GPU {index}")
        for position, figure in ((0, reading.pcie_tx_bytes_per_second), (1, reading.pcie_rx_bytes_per_second)):
            low, high = min(s[position] for s in seen), max(s[position] for s in seen)
            assert low - 100 <= figure / 1e6 <= high + 100, (index, position, figure, seen)
        for link in reading.links:  # where the GPU has NVLink: its state and, once up, a speed
            assert link.kind == "nvlink" and (link.speed_mbps is not None or not link.up), link


def test_auto_picks_nvml_on_an_nvidia_machine(nvidia: NvmlBackend) -> None:
    backend, reason = open_backend(GpuSettings(backend="auto"))
    try:
        assert reason == f"nvml: picked by auto, {len(nvidia.identities())} GPUs"
        assert backend.identities() == nvidia.identities()
    finally:
        backend.close()


@pytest.fixture(scope="module")
def amd_gpus() -> Iterator[AmdSmiBackend]:
    # amdsmi raises ImportError when not installed, KeyError without ROCm's library, its own errors without
    # the amdgpu driver.
    yield from opened(AmdSmiBackend, Exception, "ROCm amdsmi", "AMD")


def test_amdsmi_agrees_with_the_driver_sysfs(amd_gpus: AmdSmiBackend) -> None:
    sysfs = SysfsBackend()
    by_bus = {g.pci_bus_id: g.index for g in sysfs.identities()}
    for gpu in amd_gpus.identities():
        assert gpu.vendor == "amd" and gpu.uuid, gpu
        assert gpu.pci_bus_id in by_bus, f"amdsmi's {gpu.pci_bus_id} is not among the driver's cards {by_bus}"
        reading = amd_gpus.read(gpu.index, processes=False)
        driver = sysfs.read(by_bus[gpu.pci_bus_id], processes=False)
        total, used = reading.memory_total_mib, reading.memory_used_mib
        assert total is not None and used is not None, (gpu, reading)
        assert driver.memory_total_mib is not None and driver.memory_used_mib is not None, (gpu, driver)
        assert total == driver.memory_total_mib
        assert abs(used - driver.memory_used_mib) <= max(16, total // 100)
        assert reading.temperature_c is not None and 0 < reading.temperature_c < 120, (gpu, reading)
