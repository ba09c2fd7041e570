"""Planning time: a 70B header with a 152k-token vocabulary, 20 models on 8 GPUs, and refusals on 8 GPUs of
24 GiB (a 405B header; the 70B at a 1M-token context), with the ways out the planner works out for them;
and headers of a few hundred bytes claiming 1,000 to 20,000 layers (planning must be linear in them).

Usage: .venv/bin/python bench/planning.py [--runs N] [--layers N ...] [--only-layers]

The baseline is gguf.GGUFReader on the same header (read once: it takes seconds), which the planner's
own header reader replaces. The layer rows run against any launcher tree (run this file with another
tree's interpreter to measure it before a change): a header the planner refuses is timed to its refusal.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path

import gguf

from launcher.config_gpus import GpuSettings
from launcher.config_model import ModelSettings
from launcher.gpu.types import Link
from launcher.plan.estimate import ModelShape
from launcher.plan.gguf import read_gguf
from launcher.plan.model_plan import make_plan
from launcher.schema_gpus import GpuSample
from launcher.tinymodel import TinyShape, write_tiny_llama

BIG = TinyShape(
    n_layer=80, n_embd=8192, n_head=64, n_head_kv=8, n_ff=28672, extra_tokens=152064 - 259, weight_type="q8_0"
)
# Llama-3.1-405B-like, q8_0: about 400 GiB of weights.
HUGE = TinyShape(
    n_layer=126, n_embd=16384, n_head=128, n_head_kv=8, n_ff=53248, extra_tokens=128256 - 259, weight_type="q8_0"
)
# A 262k-token vocabulary (Gemma 3's), the issue's planning-time target (200 ms).
WIDE_VOCAB = TinyShape(
    n_layer=62, n_embd=5376, n_head=32, n_head_kv=16, n_ff=21504, extra_tokens=262144 - 259, weight_type="q8_0"
)
SMALL = TinyShape(n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, extra_tokens=128000, weight_type="q8_0")


def timed(runs: int, work: object) -> list[float]:
    assert callable(work)
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        work()
        times.append(time.perf_counter() - began)
    return times


def gpu(index: int, total: int | None = None) -> GpuSample:
    total = total or (81920 if index < 4 else 24576)
    return GpuSample(
        index=index, uuid=f"GPU-{index}", name="sim", pci_bus_id=None, vendor="nvidia", time=0,
        memory_total_mib=total, memory_used_mib=0, memory_free_mib=total,
    )  # fmt: skip


def deep_header(path: Path, n_layer: int) -> Path:
    """A header of a few hundred bytes: no tensors, ``n_layer`` layers of heads 16 wide, for which no
    flash-attention kernel exists (so `-fa auto` is off on a GPU and the V cache is padded to the widest
    layer's rows: the path that was quadratic)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    keys = {"block_count": n_layer, "embedding_length": 64, "attention.head_count": 4, "attention.head_count_kv": 2,
            "context_length": 4096, "feed_forward_length": 128}  # fmt: skip
    for key, value in keys.items():
        writer.add_uint32(f"llama.{key}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


def plan_deep(path: Path, gpus: list[GpuSample]) -> str:
    """Read, estimate and plan ``path``; what came of it (a refusal is an outcome too)."""
    try:
        shape = ModelShape.of(read_gguf(path))
        found = make_plan("deep", ModelSettings(model=path), shape, gpus, {}, {}, GpuSettings())
    except Exception as exc:
        return f"refused: {exc}".replace(str(path.parent), "TMP")
    return f"fits: {found.fits}, {found.gpu_layers} units on {len(found.devices)} GPUs"


def deep_rows(runs: int, layers: list[int]) -> None:
    """Read + estimate + plan of each deep header on 8 GPUs: median ms, ms per 1,000 layers, outcome."""
    gpus = [gpu(i) for i in range(8)]
    print("| header | bytes | median ms | ms per 1,000 layers | outcome |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n_layer in layers:
            path = deep_header(Path(tmp) / f"deep{n_layer}.gguf", n_layer)
            ms = statistics.median(timed(runs, functools.partial(plan_deep, path, gpus))) * 1000
            size, outcome = path.stat().st_size, plan_deep(path, gpus)
            print(f"| {n_layer} layers | {size} | {ms:.1f} | {ms / n_layer * 1000:.1f} | {outcome} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--layers", type=int, nargs="*", default=[1000, 5000, 16384, 20000])
    parser.add_argument("--only-layers", action="store_true")
    options = parser.parse_args()
    runs = options.runs
    if options.only_layers:
        deep_rows(runs, options.layers)
        return
    with tempfile.TemporaryDirectory() as tmp:
        big = write_tiny_llama(Path(tmp) / "big.gguf", BIG, header_only=True)
        small = write_tiny_llama(Path(tmp) / "small.gguf", SMALL, header_only=True)
        baseline = timed(1, lambda: gguf.GGUFReader(str(big)))
        settings = GpuSettings()
        model = ModelSettings(model=big, ctx=8192)
        gpus = [gpu(i) for i in range(8)]
        links = {(i, j): Link.NVLINK if i // 4 == j // 4 else Link.CROSS_CPU for i in range(8) for j in range(i + 1, 8)}

        def plan_big() -> None:
            make_plan("big", model, ModelShape.of(read_gguf(big)), gpus, links, {}, settings)

        header = timed(runs, lambda: read_gguf(big))
        whole = timed(runs, plan_big)
        wide = write_tiny_llama(Path(tmp) / "wide.gguf", WIDE_VOCAB, header_only=True)
        wide_model = ModelSettings(model=wide, ctx=32768)
        wide_vocab = timed(
            runs, lambda: make_plan("wide", wide_model, ModelShape.of(read_gguf(wide)), gpus, links, {}, settings)
        )

        small_shape = ModelShape.of(read_gguf(small))
        small_model = ModelSettings(model=small, ctx=8192)

        def twenty() -> None:
            claims: dict[int, int] = {}
            for n in range(20):
                p = make_plan(f"m{n}", small_model, small_shape, gpus, links, claims, settings)
                for index, mib in p.claims_mib.items():
                    claims[index] = claims.get(index, 0) + mib

        many = timed(runs, twenty)

        huge = write_tiny_llama(Path(tmp) / "huge.gguf", HUGE, header_only=True)
        huge_shape = ModelShape.of(read_gguf(huge))
        huge_model = ModelSettings(model=huge, ctx=8192)
        small_gpus = [gpu(i, 24576) for i in range(8)]

        big_shape = ModelShape.of(read_gguf(big))
        long_model = ModelSettings(model=big, ctx=1048576)

        def refuse(name: str, model: ModelSettings, shape: ModelShape) -> None:
            p = make_plan(name, model, shape, small_gpus, links, {}, settings)
            assert not p.fits and p.suggestions

        refusal = timed(runs, lambda: refuse("huge", huge_model, huge_shape))
        long_refusal = timed(runs, lambda: refuse("big", long_model, big_shape))
    base = baseline[0]
    print(f"runs: {runs}; header: 80 layers, 152064-token vocabulary, 70 GiB q8_0 (sparse file)")
    print("| measure | median ms | vs gguf.GGUFReader |")
    print("|---|---|---|")
    print(f"| gguf.GGUFReader on the header (baseline, 1 run) | {base * 1000:.0f} | 1.00x |")
    for label, values in (
        ("launcher header read (read_gguf)", header),
        ("read + estimate + plan on 8 GPUs", whole),
        ("read + estimate + plan on 8 GPUs, 262144-token vocabulary (62 layers)", wide_vocab),
        ("20 models (8B, 128k vocab) planned in turn on 8 GPUs, each around the others' claims", many),
        ("refusal with its suggestions: 405B q8_0 (126 layers, 400 GiB) on 8 GPUs of 24 GiB", refusal),
        ("refusal with its suggestions: the 70B at a 1M-token context on 8 GPUs of 24 GiB", long_refusal),
    ):
        med = statistics.median(values)
        print(f"| {label} | {med * 1000:.1f} | {med / base:.4f}x |")
    print()
    deep_rows(runs, options.layers)


if __name__ == "__main__":
    main()
