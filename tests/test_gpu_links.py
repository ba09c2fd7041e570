"""PCIe and NVLink/xGMI traffic: read from NVML and amdsmi (fakes built from the libraries' own structures
and constants), counters made rates, simulated traffic, and what /gpus, /metrics, the CLI and doctor show."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from launcher.config_gpus import SimGpu
from launcher.gpu.amd import AmdSmiBackend
from launcher.gpu.link_health import link_problems
from launcher.gpu.nvml import NvmlBackend
from launcher.gpu.rates import Count, bytes_per_second
from launcher.gpu.sim import SimBackend
from launcher.schema_gpus import GpuLinkReading
from tests.conftest import ConfigWriter, Daemon, poll_until, run_cli
from tests.fakes import FakeAmdSmi, FakeGpu, FakeNvml
from tests.test_gpu_backends import amd_card

KIB = 1024


def test_a_counter_becomes_a_rate_and_a_reset_gives_none() -> None:
    assert bytes_per_second(None, Count(100, 1.0)) is None  # the first reading: no rate yet
    assert bytes_per_second(Count(100, 1.0), Count(600, 3.0)) == 250.0
    assert bytes_per_second(Count(600, 3.0), Count(10, 4.0)) is None  # went back: reset or wrapped
    assert bytes_per_second(Count(600, 3.0), Count(700, 3.0)) is None  # no time passed


def test_nvml_pcie_throughput_and_nvlink_counters() -> None:
    a = FakeGpu(bus_id="00000000:01:00.0", nvlink_to="00000000:02:00.0", pcie_kib_per_s=(2048, 512))
    b = FakeGpu(bus_id="00000000:02:00.0", uuid="GPU-b")
    fake = FakeNvml([a, b])
    backend = NvmlBackend(fake)
    first = backend.read(0, processes=False)
    assert (first.pcie_tx_bytes_per_second, first.pcie_rx_bytes_per_second) == (2048 * KIB, 512 * KIB)
    (link,) = first.links
    assert (link.link, link.kind, link.up, link.peer, link.speed_mbps) == (0, "nvlink", True, "1", 25_781)
    assert link.tx_bytes_per_second is None  # one reading of a counter is no rate
    a.nvlink_kib, a.nvlink_time_us = (1_000_000, 250_000), 2_000_000  # 2 s later
    (link,) = backend.read(0, processes=False).links
    assert (link.tx_bytes_per_second, link.rx_bytes_per_second) == (500_000 * KIB, 125_000 * KIB)
    assert backend.read(1, processes=False).links == ()  # no NVLink: NotSupported for every link number


def test_nvml_link_down_and_unsupported_throughput() -> None:
    a = FakeGpu(nvlink_to="00000000:09:00.0", nvlink_up=False, unsupported={"nvmlDeviceGetPcieThroughput"})
    reading = NvmlBackend(FakeNvml([a])).read(0, processes=False)
    assert reading.pcie_tx_bytes_per_second is None and reading.pcie_rx_bytes_per_second is None
    (link,) = reading.links
    assert not link.up and link.peer is None


def test_amdsmi_xgmi_counters_become_rates() -> None:
    metrics = {"xgmi_read_data_acc": [0, 0, "N/A"], "xgmi_write_data_acc": [0, 0, "N/A"], "xgmi_link_speed": 32}
    fake = FakeAmdSmi([amd_card(metrics=metrics)])
    backend = AmdSmiBackend(fake)
    first = backend.read(0, processes=False).links
    assert [(x.link, x.kind, x.up, x.speed_mbps) for x in first] == [
        (0, "xgmi", True, 4000.0),
        (1, "xgmi", True, 4000.0),
    ]
    fake.cards[0]["metrics"] = {
        **metrics,
        "xgmi_read_data_acc": [10**6, 0, "N/A"],
        "xgmi_write_data_acc": [0, 0, "N/A"],
    }
    link0 = backend.read(0, processes=False).links[0]
    assert link0.rx_bytes_per_second is not None and link0.rx_bytes_per_second > 0
    assert link0.tx_bytes_per_second == 0.0
    assert AmdSmiBackend(FakeAmdSmi([amd_card()])).read(0, processes=False).links == ()  # no metrics table


def test_sim_links_follow_the_group_and_the_script() -> None:
    group = {"name": "Sim", "memory_mib": 1024, "link_group": "a"}
    first_gpu = {**group, "pcie_tx_mib_per_s": [1, 2], "link_tx_mib_per_s": 3, "links_down": [1]}
    gpus = [SimGpu.model_validate(g) for g in (first_gpu, group, group, {"name": "Alone", "memory_mib": 1024})]
    backend = SimBackend(gpus)
    first, second = backend.read(0, processes=False), backend.read(0, processes=False)
    assert (first.pcie_tx_bytes_per_second, second.pcie_tx_bytes_per_second) == (2**20, 2 * 2**20)
    assert [(x.link, x.peer, x.up) for x in first.links] == [(0, "1", True), (1, "2", False)]
    assert first.links[0].tx_bytes_per_second == 3 * 2**20 and first.links[1].tx_bytes_per_second == 0.0
    assert backend.read(3, processes=False).links == ()


def _link(link: int, *, up: bool = True, speed: float | None = 25_000, peer: str | None = "1") -> GpuLinkReading:
    return GpuLinkReading(link=link, kind="nvlink", up=up, peer=peer, speed_mbps=speed)


def test_link_problems() -> None:
    assert link_problems([_link(0, up=False), _link(1, up=False)]) == []  # no bridge fitted: none in use
    assert link_problems([_link(0), _link(1)]) == []
    assert link_problems([_link(0), _link(1, up=False, peer="00000000:09:00.0")]) == [
        "nvlink link 1 (to 00000000:09:00.0) is down while other links are up"
    ]
    assert link_problems([_link(0), _link(1, speed=12_500)]) == ["nvlink link 1 (to GPU 1) runs at 12500 of 25000 MB/s"]


LINKED = {"name": "Sim", "memory_mib": 8192, "link_group": "a", "link_tx_mib_per_s": 100, "link_rx_mib_per_s": 50}


def test_gpus_metrics_and_cli_show_the_traffic(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon]
) -> None:
    sim = [{**LINKED, "pcie_tx_mib_per_s": 10, "pcie_rx_mib_per_s": 20}, LINKED]
    daemon = start_daemon(write_config({}, gpus={"backend": "sim", "poll_interval": 0.2, "sim": sim}))
    gpus = daemon.http.get("/gpus").json()
    assert gpus[0]["pcie_tx_bytes_per_second"] == 10 * 2**20
    assert gpus[0]["links"][0] == {
        "link": 0,
        "kind": "nvlink",
        "up": True,
        "peer": "1",
        "speed_mbps": 25000.0,
        "speed_max_mbps": 25000.0,
        "tx_bytes_per_second": 100 * 2**20,
        "rx_bytes_per_second": 50 * 2**20,
    }
    families = {f.name: f for f in text_string_to_metric_families(daemon.http.get("/metrics").text)}
    tx = [s for s in families["launcher_gpu_link_tx_bytes_per_second"].samples if s.labels["gpu"] == "0"]
    assert [(s.labels["link"], s.labels["peer"], s.value) for s in tx] == [("0", "1", 100 * 2**20)]
    pcie = families["launcher_gpu_pcie_rx_bytes_per_second"].samples
    assert {s.labels["gpu"]: s.value for s in pcie} == {"0": 20 * 2**20, "1": 0.0}
    table = daemon.cli("gpus").stdout
    assert "10.5 MB/s / 21.0 MB/s" in table and "nvlink 1/1 up, 104.9 MB/s / 52.4 MB/s" in table


def test_watch_redraws_the_traffic(write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon]) -> None:
    sim = [{**LINKED, "link_tx_mib_per_s": [1, 1, 1000]}, LINKED]
    daemon = start_daemon(write_config({}, gpus={"backend": "sim", "poll_interval": 0.2, "sim": sim}))
    poll_until(lambda: daemon.http.get("/gpus").json()[0]["links"][0]["tx_bytes_per_second"], bool, "traffic", 10)
    watch = subprocess.Popen(
        [sys.executable, "-m", "launcher", "--config", str(daemon.config), "gpus", "--watch"],
        env=daemon.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert watch.stdout is not None
        for line in watch.stdout:
            if "nvlink 1/1 up, 1.0 GB/s" in line:
                break
        else:
            raise AssertionError("the watch never showed the scripted traffic")
    finally:
        watch.terminate()
        watch.wait(10)


def test_doctor_warns_of_a_link_down(write_config: ConfigWriter, marked_env: dict[str, str]) -> None:
    sim = [{**LINKED, "links_down": [1]}, LINKED, LINKED]
    config = write_config(gpus={"backend": "sim", "sim": sim})
    findings = json.loads(run_cli("--config", str(config), "doctor", "--json", env=marked_env).stdout)
    links = [f["message"] for f in findings if f["check"] == "links"]
    assert links == ["GPU 0 (Sim): nvlink link 1 (to GPU 2) is down while other links are up"]


@pytest.mark.parametrize("value", [-1, "fast"])
def test_bad_scripted_traffic_is_a_config_error(value: object) -> None:
    with pytest.raises(ValueError, match="pcie_tx_mib_per_s"):
        SimGpu(name="Sim", memory_mib=1024, pcie_tx_mib_per_s=value)  # type: ignore[arg-type]
