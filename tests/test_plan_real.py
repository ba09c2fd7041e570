"""The plan against a real llama-server on several real llama.cpp devices (one ggml-rpc-server each),
launched with exactly the command line and environment the launcher builds from its plan, with only
`--rpc` added: per device, the planned weights and KV cache within 2 % (or the 1 MiB the plan rounds up
to) of what llama-server reports with -lv 4, and the total within 5 % or 64 MiB. bench/accuracy.py runs
the whole grid; this is its sample in the test suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.accuracy import SHAPES
from bench.realbuffers import measure_argv, rpc_servers
from bench.realplan import planned_launch
from launcher.backends.llama_server import find_llama_server
from launcher.config_model import ModelSettings
from launcher.tinymodel import write_tiny_llama
from tests.archmodels import write_gemma3, write_mamba, write_qwen3moe
from tests.conftest import MARK


def check_devices(devices: int, model: ModelSettings, total_rel: float = 0.05, total_abs_mib: float = 64) -> None:
    """Plan ``model`` on simulated GPUs sized so the planner must use all ``devices`` of them, unevenly
    (3:2:1), with nothing held back; launch exactly the launcher's command line on as many real llama.cpp
    devices; compare each device's buffers with the plan (totals within ``total_rel`` or ``total_abs_mib``)."""
    launch = planned_launch(model, devices)
    placed = launch.placed
    assert len(placed.plan.devices) == devices
    assert launch.argv[0] == str(find_llama_server(None))  # what the launcher launches
    with rpc_servers(Path(launch.argv[0]).parent, devices) as addresses:
        reported = measure_argv([*launch.argv, "--rpc", ",".join(addresses)], launch.port, launch.env)
    for device, address in zip(placed.plan.devices, addresses, strict=True):
        real = reported.devices[address]
        assert device.weights_mib == pytest.approx(real.model, rel=0.02, abs=1.0)
        assert device.kv_cache_mib == pytest.approx(real.kv, rel=0.02, abs=1.0)
        assert device.recurrent_mib == pytest.approx(real.state, rel=0.02, abs=1.0)
        planned_total = device.weights_mib + device.kv_cache_mib + device.recurrent_mib + device.compute_mib
        assert abs(planned_total - real.total) <= max(total_rel * real.total, total_abs_mib)
    assert placed.plan.host.weights_mib == pytest.approx(reported.host.model, rel=0.02, abs=1.0)


@pytest.mark.parametrize(
    ("shape", "devices", "ctx", "cache"),
    [("gqa f32 hd128", 3, 4096, "f16"), ("mha q8_0 hd64 v20k", 2, 4096, "q8_0"), ("tied hd64", 1, 2048, "f16")],
)
def test_each_device_holds_what_was_planned(
    shape: str,
    devices: int,
    ctx: int,
    cache: str,
    tmp_path: Path,
    leaves_no_process: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(MARK, leaves_no_process)  # the rpc servers and llama-server are checked for leftovers
    model_path = write_tiny_llama(tmp_path / "m.gguf", SHAPES[shape])
    args = ["-fa", "on", "-ctk", cache, "-ctv", cache, "-lv", "4"]  # -lv 4: llama-server reports its buffers
    check_devices(devices, ModelSettings(model=model_path, ctx=ctx, args=args))


@pytest.mark.parametrize(
    ("kind", "ctx", "args"),
    [
        ("gemma3", 8192, []),  # every sixth layer global, the others over a 512-token window (4 slots)
        ("gemma3", 8192, ["-np", "2"]),  # two streams of 4096 cells; windows of 512 + 512
        ("mamba", 4096, []),  # no KV cache: a recurrent state per layer and slot
        # The first two layers' experts stay in host memory. Not mapped: a mapped host buffer spans the file
        # from its first host tensor to its last, other devices' tensors between them included.
        ("qwen3moe", 4096, ["--n-cpu-moe", "2", "--load-mode", "none"]),
    ],
)
def test_other_architectures_hold_what_was_planned(
    kind: str, ctx: int, args: list[str], tmp_path: Path, leaves_no_process: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MARK, leaves_no_process)
    # Weights large enough beside the compute buffers that two devices are worth it.
    path = tmp_path / f"{kind}.gguf"
    if kind == "gemma3":
        model_path = write_gemma3(path, 12, 512, 2048, (512, 4, 2, 64, 4096))
    else:
        model_path = (write_mamba if kind == "mamba" else write_qwen3moe)(path, 6, 2048, 1024)
    model = ModelSettings(model=model_path, ctx=ctx, args=["-fa", "on", *args, "-lv", "4"])
    check_devices(2, model)
