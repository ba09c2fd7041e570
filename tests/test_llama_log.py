"""llama-server's load log read into MiB per device and term, and a plan checked against it: from excerpts
of real logs of this build (tests/llama_logs: a llama split over two ggml-rpc-servers, a Mamba on one,
both at -lv 4) and lines in the formats llama.cpp's source prints for CUDA, ROCm, Vulkan and the host."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from launcher.backends.llama_log import TERMS, Where, check, parse
from launcher.backends.llama_server import LlamaServerBackend
from launcher.config_model import ModelSettings
from launcher.schema_plans import Plan

LOGS = Path(__file__).parent / "llama_logs"
B, C = "127.0.0.1:51101", "127.0.0.1:51102"


def _terms(**mib: float) -> dict[str, float]:
    return {**dict.fromkeys(TERMS, 0.0), **mib}


def _device(gpu: int, *, endpoint: str | None = None, host: str = "local", **mib: int) -> dict[str, Any]:
    sizes = {"weights_mib": 0, "kv_cache_mib": 0, "compute_mib": 0, "recurrent_mib": 0, **mib}
    total = sum(sizes.values())
    return {
        "gpu": gpu,
        "uuid": f"GPU-{gpu}",
        "name": "Sim",
        "layers": 1,
        "output_layer": False,
        "overhead_mib": 0,
        "total_mib": total,
        "usable_mib": 100,
        "free_after_mib": 100 - total,
        "host": host,
        "endpoint": endpoint,
        **sizes,
    }


def _plan(*devices: dict[str, Any], **host: int) -> Plan:
    return Plan.model_validate(
        {
            "model": "m.gguf",
            "backend": "llama-server",
            "fits": True,
            "reason": None,
            "suggestions": [],
            "ctx": 512,
            "flash_attn": False,
            "cache_type_k": "f16",
            "cache_type_v": "f16",
            "gpu_layers": 9,
            "devices": list(devices),
            "host": {"weights_mib": 0, "kv_cache_mib": 0, "compute_mib": 0, **host},
            "tensor_split": [],
        }
    )


def test_a_split_over_two_rpc_servers_is_read_per_endpoint_and_term() -> None:
    reported = parse((LOGS / "rpc_split.log").read_text())
    assert reported.of(Where(rpc=B)) == _terms(weights=0.50, kv=0.44, compute=4.68)
    assert reported.of(Where(rpc=C)) == _terms(weights=0.10, kv=0.06, compute=2.91)
    # CPU_Mapped (the token embeddings) and the CPU's output and compute buffers are the host's.
    assert reported.of(Where()) == _terms(weights=0.03, output=0.0, compute=3.32)
    # Both RPC devices are named RPC0 by this build: the address tells them apart.
    assert reported.names == {Where(rpc=B): f"RPC0[{B}]", Where(rpc=C): f"RPC0[{C}]", Where(): "CPU"}
    assert reported.unknown == []


def test_a_recurrent_models_state_is_its_own_term() -> None:
    reported = parse((LOGS / "mamba_rpc.log").read_text())
    assert reported.of(Where(rpc=B)) == _terms(weights=11.03, state=0.89, compute=6.25)
    assert reported.of(Where()) == _terms(weights=1.00, output=0.03, compute=2.01)


def test_a_projector_counts_with_the_weights_of_its_device() -> None:
    reported = parse((LOGS / "gemma3_mmproj_rpc.log").read_text())
    # The model's 9.15 and the projector's 0.78 (`CLIP using ... backend`, then `model size:`); the KV
    # of the sliding-window and the full layers; the model's and the projector's compute buffers.
    assert reported.of(Where(rpc=B)) == _terms(weights=9.15 + 0.78, kv=0.50 + 2.50, compute=5.02 + 0.86)
    assert reported.of(Where()) == _terms(weights=0.33, output=0.02, compute=3.03 + 0.57)


def test_local_gpus_by_their_number_pinned_and_repacked_host_buffers_and_unknown_names() -> None:
    reported = parse((LOGS / "cuda_formats.log").read_text())
    assert reported.of(Where(local_gpu=0)) == _terms(weights=2048.25 + 100.00, kv=272.00, compute=296.01, other=1.50)
    assert reported.of(Where(local_gpu=1)) == _terms(weights=1944.26, kv=240.00, compute=296.02)
    # CUDA_Host (pinned), Vulkan_Host, CPU_Mapped and CPU_REPACK are the host's memory.
    assert reported.of(Where()) == _terms(weights=281.81 + 10.00, output=0.49, compute=16.01 + 4.00)
    assert reported.names[Where(local_gpu=1)] == "CUDA1"
    # The KV summary line (`llama_kv_cache: size = ...`) is no buffer; a name of no known device is kept aside.
    assert reported.unknown == ["SYCL-thing"]


def test_the_plan_is_checked_per_device_in_llama_cpp_order_with_the_differences() -> None:
    plan = _plan(
        _device(0, endpoint=B, host="b", weights_mib=1, kv_cache_mib=1, compute_mib=4),
        _device(0, endpoint=C, host="c", weights_mib=1, kv_cache_mib=1, compute_mib=4),
        weights_mib=1,
        compute_mib=3,
    )
    checked = check(plan, parse((LOGS / "rpc_split.log").read_text()))
    assert [(d.device, d.host, d.endpoint, d.seen) for d in checked.devices] == [
        (f"RPC0[{B}]", "b", B, True),
        (f"RPC0[{C}]", "c", C, True),
        ("CPU", "local", None, True),
    ]
    first = checked.devices[0]
    assert {t: (c.planned_mib, c.actual_mib, c.difference_mib) for t, c in first.terms.items()} == {
        "weights": (1, 0.50, -0.50),
        "kv": (1, 0.44, -0.56),
        "compute": (4, 4.68, 0.68),
        "state": (0, 0, 0),
        "output": (0, 0, 0),
        "other": (0, 0, 0),
    }
    assert (first.planned_mib, first.actual_mib, first.difference_mib) == (6, 5.62, -0.38)
    assert checked.devices[2].difference_mib == round(0.03 + 3.32 - 4, 2)
    assert checked.unmatched == []


def test_a_device_the_plan_has_and_the_server_not_and_the_other_way_round() -> None:
    # The plan puts a layer on this host's GPU 3 (the server sees it as its first GPU) and one on B; the
    # server used B and C: its first GPU is unseen (planned against nothing), C is unmatched.
    plan = _plan(_device(0, endpoint=B, weights_mib=1), _device(3, weights_mib=2))
    checked = check(plan, parse((LOGS / "rpc_split.log").read_text()))
    gpu = checked.devices[1]
    assert (gpu.device, gpu.gpu, gpu.seen, gpu.actual_mib, gpu.difference_mib) == ("GPU 3 (Sim)", 3, False, 0, -2)
    assert checked.unmatched == [f"RPC0[{C}]"]
    # With CUDA logs, the plan's first local GPU is CUDA0 whatever its index on this host.
    cuda = check(_plan(_device(3, weights_mib=2048)), parse((LOGS / "cuda_formats.log").read_text()))
    assert (cuda.devices[0].device, cuda.devices[0].terms["weights"].actual_mib) == ("CUDA0", 2148.25)
    assert cuda.unmatched == ["CUDA1", "SYCL-thing"]


@pytest.mark.parametrize(
    "log",
    [
        "",
        "load_tensors: model buffer size = 12 MiB",  # no device
        "x: CUDA0 model buffer size = -3 MiB",  # not a size
        "x: CUDA0 model buffer size = 1e999 MiB",
        "x: CUDA0 model buffer size = " + "9" * 400 + " MiB",
        "\x00\xff" * 1000,
        # A model's metadata as llama.cpp prints it at -lv 4 can say anything, but is no buffer line.
        "llama_model_loader: - kv   0: general.name str = x: CUDA0 model buffer size = 9 MiB",
        "0.00.061 I llama_model_loader: - kv   1: general.name str = CLIP using CUDA0 backend",
    ],
)
def test_a_log_that_says_nothing_usable_is_no_check_and_says_why(log: str) -> None:
    backend = LlamaServerBackend(ModelSettings(model=Path("m.gguf")))
    found = backend.check_plan(_plan(_device(0, weights_mib=1)), log.splitlines())
    assert found == "llama-server logged no buffer sizes (it does from -lv 4: the model's args set a lower verbosity)"
