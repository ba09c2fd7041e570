"""The plan against a real llama-server on several real llama.cpp devices (one ggml-rpc-server each):
per device, the planned weights and KV cache within 2 % of what llama-server reports with -lv 4, and the
total within 5 % or 64 MiB. bench/accuracy.py runs the whole grid; this is its sample in the test suite."""

from __future__ import annotations

import pytest

from bench.accuracy import SHAPES, launch_args, plan_for
from bench.realbuffers import Buffers, measure, rpc_servers
from launcher.backends.llama_server import find_llama_server
from launcher.plan.estimate import MIB, ModelShape, Runtime
from launcher.plan.gguf import read_gguf
from launcher.tinymodel import write_tiny_llama
from tests.conftest import MARK


@pytest.mark.parametrize(
    ("shape", "devices", "ctx", "cache"),
    [("gqa f32 hd128", 3, 4096, "f16"), ("mha q8_0 hd64 v20k", 2, 4096, "q8_0"), ("tied hd64", 1, 2048, "f16")],
)
def test_each_device_holds_what_was_planned(
    shape: str,
    devices: int,
    ctx: int,
    cache: str,
    tmp_path: object,
    monkeypatch: pytest.MonkeyPatch,
    leaves_no_process: str,
) -> None:
    monkeypatch.setenv(MARK, leaves_no_process)  # the rpc servers and llama-server are checked for leftovers
    model = write_tiny_llama(tmp_path / "m.gguf", SHAPES[shape])  # type: ignore[operator]
    facts = ModelShape.of(read_gguf(model))
    runtime = Runtime(ctx=ctx, cache_type_k=cache, cache_type_v=cache, flash_attn=True)
    layout = plan_for(facts, runtime, devices)
    assert len(layout.devices) == devices
    server = find_llama_server(None)
    with rpc_servers(server.parent, devices) as addresses:
        reported = measure(server, launch_args(model, runtime, layout, addresses))
    for device, address in zip(layout.devices, addresses, strict=True):
        real = reported.devices[address]
        planned = Buffers(device.weights_b / MIB, device.kv_b / MIB, device.compute_b / MIB)
        assert planned.model == pytest.approx(real.model, rel=0.02, abs=0.01)
        assert planned.kv == pytest.approx(real.kv, rel=0.02, abs=0.01)
        assert abs(planned.total - real.total) <= max(0.05 * real.total, 64)
    assert layout.host.weights_b / MIB == pytest.approx(reported.host.model, rel=0.02, abs=0.01)
