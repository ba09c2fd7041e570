"""The real-GPU check (scripts/gpu-check, bench/gpu.py) in its rehearsal: its pure parts, and the steps that
run here against a simulated GPU and the CPU llama-server, so that a lent GPU's first run is not its first
try. The whole rehearsal takes minutes: `scripts/gpu-check` runs it."""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import gpu_buffers, gpu_smi
from bench.gpu import filling, header, nvml_vs_smi
from bench.gpu_buffers import Setup
from launcher.config_gpus import GpuSettings
from launcher.gpu import open_backend
from launcher.schema_gpus import GpuReading
from launcher.tinymodel import TinyShape
from tests.conftest import MARK

READING = GpuReading(
    memory_total_mib=143771,
    memory_used_mib=5120,
    temperature_c=41.0,
    utilization_pct=3.0,
    power_w=118.5,
    power_limit_w=700.0,
    pcie_gen=5,
    pcie_gen_max=5,
    pcie_width=16,
    pcie_width_max=16,
    throttle=("power-cap",),
)
SIM = {"backend": "sim", "sim": [{"name": "Simulated H200", "memory_mib": 4096}]}


def test_what_nvidia_smi_prints_for_a_reading_agrees_with_it_field_by_field() -> None:
    rows = gpu_smi.compare(READING, gpu_smi.parse_gpu_line(gpu_smi.smi_line_of(READING)))
    assert len(rows) == len(gpu_smi.FIELDS) + 1
    assert all(row.agrees is True for row in rows), rows
    assert rows[-1].smi == "power-cap"


def test_a_difference_beyond_tolerance_disagrees_and_a_missing_value_is_not_compared() -> None:
    smi = gpu_smi.parse_gpu_line(gpu_smi.smi_line_of(READING))
    smi["memory.used"] = "9216"  # 4 GiB more than NVML read
    smi["pcie.link.gen.current"] = "[N/A]"
    smi["clocks_event_reasons.sw_power_cap"] = "Not Active"
    agrees = {row.field.split(" /")[0]: row.agrees for row in gpu_smi.compare(READING, smi)}
    assert agrees["memory_used_mib"] is False
    assert agrees["pcie_gen"] is None
    assert agrees["throttle"] is False
    assert agrees["memory_total_mib"] is True


def test_a_line_with_the_wrong_number_of_values_is_refused() -> None:
    with pytest.raises(ValueError, match="values for"):
        gpu_smi.parse_gpu_line("1, 2, 3")


def test_compute_apps_by_pid() -> None:
    assert gpu_smi.parse_apps("4242, 1503\n77, [N/A]\n") == {4242: 1503, 77: None}
    assert gpu_smi.parse_apps("") == {}


def test_the_product_model_fills_about_80_percent_of_an_h200(tmp_path: Path, llama_server: Path) -> None:
    h200 = {"backend": "sim", "sim": [{"name": "NVIDIA H200", "memory_mib": 143771}]}
    backend, _ = open_backend(GpuSettings.model_validate(h200))
    setup = Setup(backend, llama_server, h200, tmp_path, tmp_path, real=True, deadline=0)
    shape, ctx = filling(143771, real=True)
    plan = setup.plan(setup.model("big", shape), ctx, [])
    backend.close()
    assert plan.fits, plan.reason
    assert 0.7 * 143771 < plan.devices[0].total_mib < 0.85 * 143771
    assert plan.devices[0].weights_mib < 8 * 1024  # the zeros a load reads: a few GiB


@pytest.fixture
def rehearsal(tmp_path: Path, llama_server: Path) -> Iterator[Setup]:
    backend, _ = open_backend(GpuSettings.model_validate(SIM))
    logs = tmp_path / "logs"
    logs.mkdir()
    yield Setup(backend, llama_server, SIM, tmp_path, logs, real=False, deadline=time.monotonic() + 120)
    backend.close()


def test_the_nvml_step_rehearses_on_a_simulated_gpu(rehearsal: Setup) -> None:
    table = nvml_vs_smi(rehearsal)
    assert table[0].startswith("| field")
    assert len(table) == 2 + len(gpu_smi.FIELDS) + 1
    assert all(line.endswith("| yes |") for line in table[2:])


def test_the_planner_step_runs_every_case_on_the_cpu_server(
    rehearsal: Setup, leaves_no_process: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MARK, leaves_no_process)  # the servers it starts carry the test's mark
    shape = TinyShape(n_embd=128, n_head=4, n_head_kv=2, n_ff=256)  # head size 32: a q8_0 V cache runs
    lines = gpu_buffers.planner_vs_cuda(rehearsal, {"tiny hd32": shape}, (512,))
    rows = [line for line in lines if line.startswith("| tiny hd32 |")]
    assert [tuple(row.split(" | ")[1:4]) for row in rows] == [
        ("512", "f16", "off (off / -)"),
        ("512", "f16", "on (on / -)"),
        # The plan is for a (simulated) GPU, whose CUDA has no flash-attention kernel for head size 32; the
        # CPU server runs it for every head size: the rehearsal shows what the card will settle.
        ("512", "f16", "auto (off / enabled)"),
        ("512", "q8_0", "on (on / -)"),
    ]
    for row in rows:  # every case planned and ran: weights, KV and compute, planned / reported
        assert re.search(r"\| \d+ / \d+ \| \d+ / \d+ \| \d+ / \d+ \| \d+ \(\d+\) \|", row), row
    assert len(list(rehearsal.logs.glob("case*.log"))) == 4


def test_the_real_path_asks_nvidia_smi_for_every_field_and_reads_its_answers(
    rehearsal: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An nvidia-smi that records how it was asked and answers as the tool does (the sim GPU's values).
    line = gpu_smi.smi_line_of(rehearsal.backend.read(0, processes=False))
    asked = tmp_path / "asked"
    tool = tmp_path / "bin" / "nvidia-smi"
    tool.parent.mkdir()
    tool.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {asked}\n'
        'case "$*" in\n'
        f'  *--query-gpu=*) echo "{line}" ;;\n'
        '  *--query-compute-apps=*) echo "4242, 1503" ;;\n'
        '  *) echo "| NVIDIA-SMI 580.159.04   Driver Version: 580.159.04   CUDA Version: 13.0 |" ;;\n'
        "esac\n"
    )
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tool.parent}:{os.environ['PATH']}")
    real = dataclasses.replace(rehearsal, real=True)
    table = nvml_vs_smi(real)
    assert all(row.endswith("| yes |") for row in table[2:]), table
    assert "- driver / CUDA: NVIDIA-SMI 580.159.04   Driver Version: 580.159.04   CUDA Version: 13.0" in header(real)
    assert gpu_buffers.process_mib(real, 4242) == (None, 1503)  # the sim GPU shows no processes
    calls = asked.read_text().splitlines()
    assert f"-i 0 --query-gpu={','.join(gpu_smi.QUERY)} --format=csv,noheader,nounits" in calls
    assert "-i 0 --query-compute-apps=pid,used_memory --format=csv,noheader,nounits" in calls
