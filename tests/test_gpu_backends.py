"""Each GPU backend's mapping from library values to samples (MiB, °C, %, W), and device visibility."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pynvml
import pytest

import launcher.gpu
from launcher.config_gpus import GpuSettings, SimGpu
from launcher.errors import StartError
from launcher.gpu import amd, nvml, open_backend, visibility_env
from launcher.gpu.amd import AmdSmiBackend
from launcher.gpu.base import NoGpus
from launcher.gpu.nvml import NvmlBackend
from launcher.gpu.sim import SimBackend
from launcher.gpu.sysfs import SysfsBackend
from launcher.gpu.types import GpuError, GpuIdentity, Link, sample_of
from launcher.schema_gpus import GpuProcess
from tests.fakes import GIB, FakeAmdSmi, FakeGpu, FakeNvml

MIB = 1024 * 1024


def test_nvml_maps_values_and_units() -> None:
    gpu = FakeGpu(processes=[(4242, 5 * GIB), (4343, None)])
    backend = NvmlBackend(FakeNvml([gpu]))
    [identity] = backend.identities()
    assert identity == GpuIdentity(0, gpu.uuid, gpu.name, gpu.bus_id, "nvidia", driver="550.54.15")
    reading = backend.read(0, processes=True)
    assert (reading.memory_total_mib, reading.memory_used_mib) == (24576, 6144)
    assert reading.temperature_c == 67.0
    assert reading.utilization_pct == 93.0
    assert (reading.power_w, reading.power_limit_w) == (215.5, 350.0)
    assert (reading.pcie_gen, reading.pcie_gen_max, reading.pcie_width, reading.pcie_width_max) == (4, 4, 16, 16)
    assert reading.throttle == ("power-cap", "sw-thermal")
    assert reading.processes == (GpuProcess(pid=4242, used_mib=5120), GpuProcess(pid=4343, used_mib=None))
    assert backend.read(0, processes=False).processes is None
    sample = sample_of(identity, reading, 0.0)
    assert sample.memory_free_mib == 24576 - 6144


def test_nvml_unsupported_values_are_none_and_init_happens_once() -> None:
    fake = FakeNvml([FakeGpu(unsupported={"power", "limit", "pcie", "reasons", "utilization", "temperature"})])
    backend = NvmlBackend(fake)
    for _ in range(3):
        reading = backend.read(0, processes=False)
    assert reading.memory_used_mib == 6144
    assert reading.power_w is None and reading.pcie_width is None and reading.utilization_pct is None
    assert reading.temperature_c is None and reading.throttle == ()
    assert fake.inits == 1


def test_nvml_lost_gpu_raises_gpu_error() -> None:
    gpu = FakeGpu()
    backend = NvmlBackend(FakeNvml([gpu]))
    gpu.lost = True
    with pytest.raises(GpuError, match="GPU is lost"):
        backend.read(0, processes=False)


def test_nvml_topology_and_nvlink() -> None:
    a = FakeGpu(bus_id="00000000:01:00.0", nvlink_to="00000000:02:00.0")
    b = FakeGpu(bus_id="00000000:02:00.0", uuid="GPU-b")
    c = FakeGpu(bus_id="00000000:81:00.0", uuid="GPU-c")
    topo = {(0, 2): pynvml.NVML_TOPOLOGY_SYSTEM, (1, 2): pynvml.NVML_TOPOLOGY_HOSTBRIDGE}
    links = NvmlBackend(FakeNvml([a, b, c], topo)).links()
    assert links == {(0, 1): Link.NVLINK, (0, 2): Link.CROSS_CPU, (1, 2): Link.HOST_BRIDGE}
    assert links[(0, 1)].direct and not links[(0, 2)].direct


def amd_card(**over: Any) -> dict[str, Any]:
    card: dict[str, Any] = {
        "bdf": "0000:03:00.0",
        "uuid": "5bff744c-0000-1000-80c4-2f3e5c7b9a11",
        "name": "Radeon RX 7900 XTX",
        "vram_total": 24560,
        "vram_used": 1200,
        "temps": [55, 71],
        "gfx": 88,
        "power": {"current_socket_power": 301, "average_socket_power": "N/A", "power_limit": 327},
        "pcie": {
            "pcie_static": {"max_pcie_width": 16, "pcie_interface_version": 4},
            "pcie_metric": {"pcie_width": 8, "pcie_speed": 16000},
        },
        "processes": [{"pid": 77, "memory_usage": {"vram_mem": 3 * GIB}}],
        "links": {1: {"hops": 1, "type": 2}},
    }
    card.update(over)
    return card


def test_amdsmi_maps_values_and_units(tmp_path: Path) -> None:
    (tmp_path / "0000:03:00.0").mkdir()
    (tmp_path / "0000:03:00.0" / "unique_id").write_text("4e1e6ebc5f06b0d5\n")
    backend = AmdSmiBackend(FakeAmdSmi([amd_card(), amd_card(bdf="0000:83:00.0", gfx="N/A")]), pci_root=tmp_path)
    first, second = backend.identities()
    assert first == GpuIdentity(0, "GPU-4e1e6ebc5f06b0d5", "Radeon RX 7900 XTX", "0000:03:00.0", "amd")
    assert second.uuid == "5bff744c-0000-1000-80c4-2f3e5c7b9a11"  # no unique_id in sysfs: amdsmi's uuid
    r = backend.read(0, processes=True)
    assert (r.memory_total_mib, r.memory_used_mib) == (24560, 1200)
    assert (r.temperature_c, r.temperature_hotspot_c) == (55.0, 71.0)
    assert (r.utilization_pct, r.power_w, r.power_limit_w) == (88.0, 301.0, 327.0)
    assert (r.pcie_gen, r.pcie_gen_max, r.pcie_width, r.pcie_width_max) == (4, 4, 8, 16)
    assert r.processes == (GpuProcess(pid=77, used_mib=3072),)
    assert backend.read(1, processes=False).utilization_pct is None  # "N/A"
    assert backend.links() == {(0, 1): Link.XGMI}


def test_amdsmi_lost_card_raises_gpu_error() -> None:
    fake = FakeAmdSmi([amd_card()])
    backend = AmdSmiBackend(fake)
    fake.cards[0]["lost"] = True
    with pytest.raises(GpuError, match="amdsmi"):
        backend.read(0, processes=False)


def write_card(root: Path, n: int, vendor: str = "0x1002", numa: int = 0) -> Path:
    device = root / f"card{n}" / "device"
    (device / "hwmon" / "hwmon3").mkdir(parents=True)
    files = {
        "vendor": vendor,
        "device": "0x744c",
        "unique_id": f"abcdef00000000{n:02d}",
        "mem_info_vram_total": str(24 * GIB),
        "mem_info_vram_used": str(2 * GIB),
        "gpu_busy_percent": "42",
        "current_link_speed": "8.0 GT/s PCIe",
        "max_link_speed": "16.0 GT/s PCIe",
        "current_link_width": "16",
        "max_link_width": "16",
        "numa_node": str(numa),
        "hwmon/hwmon3/temp1_input": "61000",
        "hwmon/hwmon3/temp1_label": "edge",
        "hwmon/hwmon3/temp2_input": "78000",
        "hwmon/hwmon3/temp2_label": "junction",
        "hwmon/hwmon3/power1_average": "250000000",
        "hwmon/hwmon3/power1_cap": "327000000",
    }
    for name, text in files.items():
        (device / name).write_text(text + "\n")
    return device


def test_sysfs_maps_values_and_units(tmp_path: Path) -> None:
    write_card(tmp_path, 0)
    write_card(tmp_path, 1, vendor="0x8086")  # an Intel iGPU is not ours
    write_card(tmp_path, 2, numa=1)
    (tmp_path / "card0-DP-1").mkdir()  # connectors are not cards
    backend = SysfsBackend(tmp_path)
    first, second = backend.identities()
    assert (first.index, first.uuid, first.vendor) == (0, "GPU-abcdef0000000000", "amd")
    assert second.uuid == "GPU-abcdef0000000002"
    r = backend.read(0, processes=False)
    assert (r.memory_total_mib, r.memory_used_mib) == (24576, 2048)
    assert (r.temperature_c, r.temperature_hotspot_c, r.utilization_pct) == (61.0, 78.0, 42.0)
    assert (r.power_w, r.power_limit_w) == (250.0, 327.0)
    assert (r.pcie_gen, r.pcie_gen_max, r.pcie_width, r.pcie_width_max) == (3, 4, 16, 16)
    assert backend.links() == {(0, 1): Link.CROSS_CPU}
    (tmp_path / "card0" / "device" / "mem_info_vram_used").unlink()  # the card fell off the bus
    with pytest.raises(GpuError, match="is the card still there"):
        backend.read(0, processes=False)


def test_sim_memory_follows_usage_temperatures_script_and_faults() -> None:
    held: dict[int, int] = {}  # what the launcher's servers hold: none, then 8000 MiB on GPU 0
    sim = SimBackend(
        [
            SimGpu(name="A", memory_mib=24576, used_mib=1000, temperature_c=[40, 95, 60], link_group="x"),
            SimGpu(name="B", memory_mib=16384, link_group="x"),
            SimGpu(name="C", memory_mib=16384),
        ],
        usage=lambda: held,
    )
    assert sim.read(0, processes=False).memory_used_mib == 1000
    held[0] = 8000
    assert sim.read(0, processes=False).memory_used_mib == 9000
    assert [sim.read(0, processes=False).temperature_c for _ in range(2)] == [60, 60]  # script ran out
    sim.inject(1, error="GPU is lost")
    with pytest.raises(GpuError, match="GPU is lost"):
        sim.read(1, processes=False)
    sim.inject(1)
    assert sim.read(1, processes=False).memory_total_mib == 16384
    assert sim.links() == {(0, 1): Link.NVLINK, (0, 2): Link.CPU, (1, 2): Link.CPU}
    assert len({g.uuid for g in sim.identities()}) == 3


NO_ROCM = KeyError("libamd_smi.so")  # what `import amdsmi` raises where ROCm's library is missing
NO_AMDSMI = ModuleNotFoundError("No module named 'amdsmi'", name="amdsmi")


def machine(
    monkeypatch: pytest.MonkeyPatch,
    drm: Path,
    nvml_lib: FakeNvml | None = None,
    amdsmi_error: Exception = NO_ROCM,
) -> None:
    """Make the GPU backends see this machine, not the host: NVML is ``nvml_lib`` (by default pynvml
    without libnvidia-ml: its nvmlInit fails), ``import amdsmi`` raises ``amdsmi_error``, and the DRM cards
    are those under ``drm``."""
    lib = nvml_lib or FakeNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    monkeypatch.setattr(nvml, "_load", lambda: lib)

    def import_amdsmi() -> Any:
        raise amdsmi_error

    monkeypatch.setattr(amd, "_import_amdsmi", import_amdsmi)
    drm.mkdir(exist_ok=True)
    monkeypatch.setitem(launcher.gpu._REAL, "sysfs", lambda: SysfsBackend(drm))


@pytest.mark.parametrize(
    ("amdsmi_error", "amdsmi_reason"),
    [(NO_ROCM, "library libamd_smi.so not found"), (NO_AMDSMI, "module amdsmi is not installed")],
)
def test_auto_without_libraries_says_why_and_runs_on_cpu(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, amdsmi_error: Exception, amdsmi_reason: str
) -> None:
    write_card(tmp_path / "drm", 0, vendor="0x8086")  # an Intel iGPU is not a GPU for us
    machine(monkeypatch, tmp_path / "drm", amdsmi_error=amdsmi_error)
    backend, reason = open_backend(GpuSettings(backend="auto"))
    assert isinstance(backend, NoGpus)
    assert reason == (
        f"none: auto found no GPU (nvml: NVML Shared Library Not Found; amdsmi: {amdsmi_reason}; sysfs: no GPU); "
        "servers run on the CPU"
    )


def test_auto_picks_the_first_backend_with_gpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    machine(monkeypatch, tmp_path / "drm", FakeNvml([FakeGpu()]))
    backend, reason = open_backend(GpuSettings(backend="auto"))
    assert isinstance(backend, NvmlBackend)
    assert reason == "nvml: picked by auto, 1 GPUs"


def test_auto_closes_a_driver_without_gpus_and_goes_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = FakeNvml([])  # the driver loads, but has no GPU (all passed to VMs, say)
    write_card(tmp_path / "drm", 0)
    machine(monkeypatch, tmp_path / "drm", empty)
    backend, reason = open_backend(GpuSettings(backend="auto"))
    assert isinstance(backend, SysfsBackend)
    assert reason == "sysfs: picked by auto, 1 GPUs"
    assert (empty.inits, empty.shutdowns) == (1, 1)


@pytest.mark.parametrize(
    ("name", "reason"), [("nvml", "NVML Shared Library Not Found"), ("amdsmi", "library libamd_smi.so not found")]
)
def test_an_explicit_backend_that_cannot_open_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: Literal["nvml", "amdsmi"], reason: str
) -> None:
    machine(monkeypatch, tmp_path / "drm")
    with pytest.raises(StartError) as raised:
        open_backend(GpuSettings(backend=name))
    assert raised.value.message == f"the {name} GPU backend cannot open: {reason}"
    assert raised.value.hint == "check the driver (`launcher doctor`), or set gpus.backend: auto"


def test_visibility_by_uuid() -> None:
    nv = [GpuIdentity(2, "GPU-b", "x", None, "nvidia"), GpuIdentity(0, "GPU-a", "x", None, "nvidia")]
    assert visibility_env(nv) == {"CUDA_VISIBLE_DEVICES": "GPU-b,GPU-a", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    amd = [GpuIdentity(1, "GPU-1234", "x", None, "amd"), GpuIdentity(3, "GPU-5678", "x", None, "amd")]
    assert visibility_env(amd) == {"ROCR_VISIBLE_DEVICES": "GPU-1234,GPU-5678", "HIP_VISIBLE_DEVICES": "0,1"}
    assert visibility_env([]) == {}
