"""`ctx: max`: the exact search, and the context the planner chooses on GPUs as they are: the largest that fits,
in llama.cpp's steps, never below `ctx_min`, shrunk by the other instances' claims. Pure: no process runs
here (tests/test_context_daemon.py starts real servers with it)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from launcher.backends.llama_server import LlamaServerBackend
from launcher.config_gpus import GpuSettings
from launcher.config_model import ModelSettings
from launcher.gpu.types import GpuIdentity
from launcher.plan.context import largest
from launcher.plan.estimate import ModelShape
from launcher.plan.gguf import read_gguf
from launcher.plan.model_plan import make_plan
from launcher.plan.planner import Planner
from launcher.schema_gpus import GpuSample
from launcher.schema_plans import Plan
from launcher.tinymodel import TinyShape, write_tiny_llama

# About 11 GiB of q8_0 weights and 160 KiB of f16 KV cache per cell, trained for 128k: a 24 GB card holds it
# with a context in the tens of thousands.
LONG = TinyShape(
    n_layer=40, n_embd=5120, n_head=40, n_head_kv=8, n_ff=13824, extra_tokens=1000, weight_type="q8_0",
    context_length=131072,
)  # fmt: skip


@pytest.fixture(scope="module")
def shape(tmp_path_factory: pytest.TempPathFactory) -> ModelShape:
    path = write_tiny_llama(tmp_path_factory.mktemp("long") / "long.gguf", LONG, header_only=True)
    return ModelShape.of(read_gguf(path))


def gpu(index: int, total_gib: float) -> GpuSample:
    total = int(total_gib * 1024)
    return GpuSample(
        index=index, uuid=f"GPU-{index}", name="GPU", pci_bus_id=None, vendor="nvidia", time=0,
        memory_total_mib=total, memory_used_mib=0, memory_free_mib=total,
    )  # fmt: skip


def plan(shape: ModelShape, samples: list[GpuSample], *, claims: dict[int, int] | None = None, **model: object) -> Plan:
    config = ModelSettings.model_validate({"model": "/m.gguf", **model})
    return make_plan("m", config, shape, samples, {}, claims or {}, GpuSettings())


def assert_largest(shape: ModelShape, samples: list[GpuSample], chosen: Plan, args: list[str] | None = None) -> None:
    """``chosen`` fits with its context, and one step more does not on as many GPUs: what the search claims.
    ``args``: the model's, besides the context."""
    assert chosen.fits and chosen.context is not None
    assert chosen.ctx % chosen.context.step == 0
    for d in chosen.devices:
        assert d.total_mib <= d.usable_mib
    again = plan(shape, samples, ctx=chosen.ctx, args=args or [])
    assert again.fits and len(again.devices) == len(chosen.devices)
    bigger = plan(shape, samples, ctx=chosen.ctx + chosen.context.step, args=args or [])
    assert not bigger.fits or len(bigger.devices) > len(chosen.devices)


# ---- the search ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("low", "high"), [(1, 1), (1, 2), (3, 17), (16, 512), (1, 1000)])
def test_largest_is_exact_for_every_threshold_within_a_logarithm_of_tries(low: int, high: int) -> None:
    for threshold in range(low - 2, high + 3):
        tried: list[int] = []

        def fits(n: int, threshold: int = threshold, tried: list[int] = tried) -> bool:
            tried.append(n)
            return n <= threshold

        expected = None if threshold < low else min(threshold, high)
        assert largest(fits, low, high) == expected
        assert len(tried) <= math.ceil(math.log2(high - low + 1)) + 2
        assert all(low <= n <= high for n in tried)


def test_largest_of_an_empty_range_is_none() -> None:
    assert largest(lambda n: True, 5, 4) is None


# ---- on GPUs ------------------------------------------------------------------------------------------


def test_the_largest_context_that_fits_one_gpu(shape: ModelShape) -> None:
    samples = [gpu(0, 24)]
    chosen = plan(shape, samples, ctx="max")
    assert_largest(shape, samples, chosen)
    assert 8192 < chosen.ctx < 131072
    assert chosen.context is not None
    assert (chosen.context.ctx_min, chosen.context.ctx_max, chosen.context.step) == (4096, 131072, 256)
    reason = chosen.context.reason
    assert reason.startswith(f"ctx {chosen.ctx}: the largest that fits GPU 0; ctx {chosen.ctx + 256} would need ")
    need, usable = _need(reason)
    assert need > usable == chosen.devices[0].usable_mib


def _need(reason: str) -> tuple[int, int]:
    """(MiB needed, MiB usable) from a reason's "would need N MiB on GPU g with this split, U MiB usable there"."""
    tail = reason.split("would need ")[1].split()
    return int(tail[0]), int(tail[8])


def test_another_instance_shrinks_it_by_its_claim(shape: ModelShape) -> None:
    samples = [gpu(0, 24)]
    alone = plan(shape, samples, ctx="max")
    beside = plan(shape, samples, claims={0: 4096}, ctx="max")
    assert beside.fits and beside.ctx < alone.ctx
    # 4 GiB at 160 KiB of KV per cell (and a compute buffer that shrinks with it): about 26k cells fewer
    assert 24000 <= alone.ctx - beside.ctx <= 27000
    assert beside.context is not None and "beside the other instances' 4096 MiB on GPU 0" in beside.context.reason
    assert not plan(shape, samples, claims={0: 4096}, ctx=beside.ctx + 256).fits


def test_a_ctx_min_that_does_not_fit_is_refused_with_the_numbers(shape: ModelShape) -> None:
    refused = plan(shape, [gpu(0, 24)], ctx="max", ctx_min=120000)
    assert not refused.fits and refused.ctx == 120064  # rounded up to the step
    assert refused.reason is not None
    assert refused.reason.startswith("not even ctx_min 120064 fits the GPUs whole: m needs ")
    assert "KV cache 18.3 GiB" in refused.reason and "but only 23.0 GiB is usable there" in refused.reason
    assert any(s.startswith("the largest context that fits is ") and "(ctx_min: " in s for s in refused.suggestions)


def test_the_suggested_ctx_min_is_per_slot_and_fits_when_followed(shape: ModelShape) -> None:
    slots = ["-np", "4"]  # a KV stream per slot: ctx_min counts one slot's cells, -c all four
    refused = plan(shape, [gpu(0, 24)], ctx="max", ctx_min=65536, args=slots)
    assert not refused.fits
    suggested = [s for s in refused.suggestions if "(ctx_min: " in s]
    assert len(suggested) == 1 and " per slot (ctx_min: " in suggested[0], refused.suggestions
    ctx_min = int(suggested[0].split("(ctx_min: ")[1].rstrip(")"))
    followed = plan(shape, [gpu(0, 24)], ctx="max", ctx_min=ctx_min, args=slots)
    assert followed.fits and followed.ctx >= 4 * ctx_min
    assert not plan(shape, [gpu(0, 24)], ctx="max", ctx_min=ctx_min + 256, args=slots).fits


def test_a_ctx_min_above_the_cap_is_refused(shape: ModelShape) -> None:
    refused = plan(shape, [gpu(0, 80)], ctx="max", ctx_min=200000)
    assert not refused.fits
    assert refused.reason == (
        "ctx_min 200000 is above the largest context ctx: max may choose, the model's trained context 131072 "
        "(raise ctx_max)"
    )


def test_the_cap_when_the_room_is_larger(shape: ModelShape) -> None:
    chosen = plan(shape, [gpu(0, 80)], ctx="max")
    assert chosen.fits and chosen.ctx == 131072
    assert chosen.context is not None
    assert chosen.context.reason.startswith("ctx 131072: the model's trained context 131072, the cap, fits GPU 0, ")
    capped = plan(shape, [gpu(0, 80)], ctx="max", ctx_max=10000)
    assert capped.ctx == 9984  # rounded down to the step


def test_slots_with_a_stream_each_step_by_the_slots(shape: ModelShape) -> None:
    samples = [gpu(0, 24)]
    chosen = plan(shape, samples, ctx="max", args=["-np", "3"])
    assert chosen.context is not None and chosen.context.step == 768
    assert (chosen.context.ctx_min, chosen.context.ctx_max) == (3 * 4096, 3 * 131072)  # per slot
    assert_largest(shape, samples, chosen, args=["-np", "3"])


def test_ctx_min_decides_the_gpu_count(shape: ModelShape) -> None:
    samples = [gpu(0, 16), gpu(1, 16)]
    one = plan(shape, samples, ctx="max")
    assert len(one.devices) == 1  # 4096 fits one card: the context grows on it, not over two
    assert_largest(shape, samples, one)
    two = plan(shape, samples, ctx="max", ctx_min=one.ctx + 256)
    assert two.fits and len(two.devices) == 2 and two.ctx > one.ctx
    assert two.context is not None and f"(the fewest on which ctx_min {one.ctx + 256} fits)" in two.context.reason
    assert_largest(shape, samples, two)


def test_without_gpus_the_cap(shape: ModelShape) -> None:
    chosen = plan(shape, [], ctx="max", ctx_max=32768)
    assert chosen.fits and chosen.ctx == 32768 and chosen.devices == []
    assert chosen.context is not None and "no GPU to size it to" in chosen.context.reason


def test_the_default_floor_is_the_trained_context_when_smaller(tmp_path: Path) -> None:
    short = ModelShape.of(read_gguf(write_tiny_llama(tmp_path / "t.gguf", TinyShape(context_length=2048))))
    chosen = plan(short, [gpu(0, 1)], ctx="max")
    assert chosen.context is not None and chosen.context.ctx_min == 2048 and chosen.ctx == 2048


def test_the_command_line_carries_the_chosen_context(shape: ModelShape) -> None:
    config = ModelSettings.model_validate({"model": "/m.gguf", "ctx": "max", "binary": "/bin/true"})
    chosen = make_plan("m", config, shape, [gpu(0, 24)], {}, {}, GpuSettings())
    planner = Planner(GpuSettings(), [GpuIdentity(0, "GPU-0", "GPU", None, "nvidia")], {})
    argv = LlamaServerBackend(config).launch_spec(config, 8080, planner.placement(chosen)).argv
    assert argv[argv.index("--ctx-size") + 1] == str(chosen.ctx)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"ctx": 4096, "ctx_min": 2048}, "ctx_min: only with ctx: max"),
        ({"ctx_max": 2048}, "ctx_max: only with ctx: max"),
        ({"ctx": "max", "args": ["-c", "4096"]}, "ctx: max chooses -c"),
        ({"ctx": "max", "ctx_min": 8192, "ctx_max": 4096}, "ctx_min 8192 is above ctx_max 4096"),
        # both allowed, yet no step of 256 between them: the planner refused every start with a false reason
        ({"ctx": "max", "ctx_min": 1000, "ctx_max": 1000}, "hold no multiple of 256 between them"),
        ({"ctx": "max", "ctx_min": 300, "ctx_max": 500}, "hold no multiple of 256 between them"),
        # -c 256 is the least llama.cpp gives: a cap below it was exceeded
        ({"ctx": "max", "ctx_max": 100}, "ctx_max 100 is below 256"),
        ({"ctx": "max", "backend": "ollama", "model": "qwen"}, "ctx: max is for llama-server"),
        ({"ctx": "most"}, "ctx"),
    ],
)
def test_bad_context_settings_are_refused(entry: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelSettings.model_validate({"model": "/m.gguf", **entry})
