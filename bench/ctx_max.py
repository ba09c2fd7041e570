"""What `ctx: max` costs a plan: a 70B-shaped header (80 layers, 152k vocabulary, trained for 128k) planned with
`ctx: max` on GPUs of 24 GiB, alone and beside another instance's claim, against the baseline of the same plan
at a fixed `ctx: 8192` in the same run (medians). The bisection plans about log2(steps) contexts.

Usage: .venv/bin/python -m bench.ctx_max [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from launcher.config_gpus import GpuSettings
from launcher.config_model import ModelSettings
from launcher.plan.estimate import ModelShape
from launcher.plan.gguf import read_gguf
from launcher.plan.model_plan import make_plan
from launcher.schema_gpus import GpuSample
from launcher.schema_plans import Plan
from launcher.tinymodel import TinyShape, write_tiny_llama

BIG = TinyShape(
    n_layer=80, n_embd=8192, n_head=64, n_head_kv=8, n_ff=28672, extra_tokens=152064 - 259, weight_type="q8_0",
    context_length=131072,
)  # fmt: skip


def gpu(index: int, total_gib: int) -> GpuSample:
    total = total_gib * 1024
    return GpuSample(
        index=index, uuid=f"GPU-{index}", name="GPU", pci_bus_id=None, vendor="nvidia", time=0,
        memory_total_mib=total, memory_used_mib=0, memory_free_mib=total,
    )  # fmt: skip


def timed(
    runs: int, shape: ModelShape, model: ModelSettings, gpus: int, claims: Mapping[int, int]
) -> tuple[float, Plan]:
    samples = [gpu(i, 24) for i in range(gpus)]
    times, plan = [], None
    for _ in range(runs):
        began = time.perf_counter()
        plan = make_plan("m", model, shape, samples, {}, claims, GpuSettings())
        times.append(time.perf_counter() - began)
    assert plan is not None
    return statistics.median(times), plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    runs = parser.parse_args().runs
    path = write_tiny_llama(Path(tempfile.mkdtemp(prefix="ctx-max-")) / "big.gguf", BIG, header_only=True)
    shape = ModelShape.of(read_gguf(path))
    fixed = ModelSettings(model=path, ctx=8192)
    largest = ModelSettings(model=path, ctx="max")
    print("| GPUs | claim | ctx 8192 | ctx: max | ratio | chosen |")
    print("|---|---|---|---|---|---|")
    for gpus, claims in ((4, {}), (4, {0: 8192}), (8, {})):
        base_s, _ = timed(runs, shape, fixed, gpus, claims)
        max_s, plan = timed(runs, shape, largest, gpus, claims)
        held = ", ".join(f"{mib} MiB on GPU {g}" for g, mib in claims.items()) or "none"
        chosen = f"ctx {plan.ctx} on {len(plan.devices)} GPUs"
        figures = f"{base_s * 1e3:.1f} ms | {max_s * 1e3:.1f} ms | {max_s / base_s:.1f}x"
        print(f"| {gpus} x 24 GiB | {held} | {figures} | {chosen} |")


if __name__ == "__main__":
    main()
