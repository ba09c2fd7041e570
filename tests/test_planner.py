"""The planner: GGUF facts, the estimate, the GPU choice and split, what it says when a model does not fit.
Pure functions: no process runs here (the comparison with llama-server is tests/test_plan_real.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.config_gpus import GpuSettings
from launcher.config_model import ModelSettings
from launcher.gpu.types import Link
from launcher.plan.estimate import MIB, ModelShape, Runtime, kv_bytes
from launcher.plan.gguf import ModelFileError, read_gguf
from launcher.plan.layout import Layout, UsableGpu, balanced, candidate_sets, counts_from_split, fewest_gpus, holds
from launcher.plan.model_plan import make_plan
from launcher.plan.runtime import runtime_for
from launcher.schema_gpus import GpuSample
from launcher.schema_plans import Plan
from launcher.tinymodel import TinyShape, write_tiny_llama

GIB = 1024

# A 70B-like model (80 layers, GQA 64/8, 152k vocabulary, q8_0 weights): a header with a sparse body.
BIG = TinyShape(
    n_layer=80, n_embd=8192, n_head=64, n_head_kv=8, n_ff=28672, extra_tokens=152064 - 259, weight_type="q8_0"
)
# About 27 GiB of q8_0 weights (+3 GiB KV at 8k): fits 24 + 16 GB split by room, not split equally.
MID = TinyShape(n_layer=100, n_embd=5120, n_head=40, n_head_kv=8, n_ff=13824, extra_tokens=1000, weight_type="q8_0")
# About 11 GiB: fits one 24 GB card at a modest context.
SMALL = TinyShape(n_layer=40, n_embd=5120, n_head=40, n_head_kv=8, n_ff=13824, extra_tokens=1000, weight_type="q8_0")


@pytest.fixture(scope="module")
def big_shape(tmp_path_factory: pytest.TempPathFactory) -> ModelShape:
    path = write_tiny_llama(tmp_path_factory.mktemp("big") / "big.gguf", BIG, header_only=True)
    return ModelShape.of(read_gguf(path))


@pytest.fixture(scope="module")
def small_shape(tmp_path_factory: pytest.TempPathFactory) -> ModelShape:
    path = write_tiny_llama(tmp_path_factory.mktemp("small") / "small.gguf", SMALL, header_only=True)
    return ModelShape.of(read_gguf(path))


@pytest.fixture(scope="module")
def mid_shape(tmp_path_factory: pytest.TempPathFactory) -> ModelShape:
    path = write_tiny_llama(tmp_path_factory.mktemp("mid") / "mid.gguf", MID, header_only=True)
    return ModelShape.of(read_gguf(path))


def gpu(index: int, total_gib: float, used_gib: float = 0, name: str = "GPU") -> GpuSample:
    total, used = int(total_gib * 1024), int(used_gib * 1024)
    return GpuSample(
        index=index, uuid=f"GPU-{index}", name=name, pci_bus_id=None, vendor="nvidia", time=0,
        memory_total_mib=total, memory_used_mib=used, memory_free_mib=total - used,
    )  # fmt: skip


def plan(
    shape: ModelShape,
    samples: list[GpuSample],
    *,
    links: dict[tuple[int, int], Link] | None = None,
    claims: dict[int, int] | None = None,
    settings: GpuSettings | None = None,
    **model: object,
) -> Plan:
    config = ModelSettings.model_validate({"model": "/m.gguf", "ctx": 8192, **model})
    return make_plan("m", config, shape, samples, links or {}, claims or {}, settings or GpuSettings())


def assert_within_room(p: Plan) -> None:
    for d in p.devices:
        assert d.total_mib <= d.usable_mib, d
        parts = (d.weights_mib, d.kv_cache_mib, d.recurrent_mib, d.projector_mib, d.compute_mib, d.overhead_mib)
        assert d.total_mib == sum(parts)


# ---- GGUF -------------------------------------------------------------------------------------------


def test_reads_metadata_and_tensor_sizes_without_data(big_shape: ModelShape) -> None:
    assert (big_shape.n_layer, big_shape.n_head, big_shape.n_head_kv[0]) == (80, 64, 8)
    assert big_shape.n_vocab == 152064
    assert big_shape.key_length == 128
    # q8_0: 34 bytes per 32 weights; per layer q, k, v, o and three FFN matrices, plus two f32 norms.
    per_layer = (8192 * 8192 * 2 + 8192 * 1024 * 2 + 3 * 8192 * 28672) * 34 // 32 + 2 * 8192 * 4
    assert big_shape.layer_bytes == (per_layer,) * 80
    assert big_shape.embedding_bytes == 152064 * 8192 * 34 // 32


def test_split_models_are_read_from_all_shards(tmp_path: Path) -> None:
    first = write_tiny_llama(tmp_path / "split.gguf", TinyShape(), shards=3)
    assert first.name == "split-00001-of-00003.gguf"
    whole = read_gguf(write_tiny_llama(tmp_path / "whole.gguf", TinyShape()))
    model = read_gguf(first)
    assert sorted(t.name for t in model.tensors) == sorted(t.name for t in whole.tensors)
    (tmp_path / "split-00003-of-00003.gguf").unlink()
    with pytest.raises(ModelFileError, match=r"split in 3 files but split-00003-of-00003\.gguf is missing"):
        read_gguf(first)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        (b"PK\x03\x04 this is a zip file, not a model at all", r"is not a GGUF model \(no GGUF magic\)"),
        (b"GGUF", r"is not a GGUF model \(too short\)"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "m.gguf"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelFileError, match=message):
        read_gguf(path)


def test_a_truncated_header_is_a_clear_error(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "m.gguf", TinyShape(extra_tokens=5000))
    path.write_bytes(path.read_bytes()[:20000])  # cut inside the vocabulary
    with pytest.raises(ModelFileError, match="the GGUF header is cut short"):
        read_gguf(path)


# ---- estimate ---------------------------------------------------------------------------------------


def test_runtime_follows_the_args_as_llama_server_reads_them(big_shape: ModelShape) -> None:
    def runtime(*args: str) -> Runtime:
        return runtime_for(ModelSettings.model_validate({"model": "/m.gguf", "args": list(args)}), big_shape)

    assert runtime() == Runtime(ctx=2048, flash_attn=True, ubatch=512, parallel=4)  # the header's context
    found = runtime("-c", "0", "--ctx-size=8192", "-ctk", "q8_0", "-ub", "1024", "-np", "2", "-fa", "disabled")
    # an explicit -np gives each slot its own KV stream (llama-server: kv_unified only when -np is auto)
    assert found == Runtime(ctx=8192, cache_type_k="q8_0", flash_attn=False, ubatch=1024, parallel=2, kv_unified=False)
    assert runtime("-np", "-1") == runtime()  # llama-server's auto: 4 slots
    assert runtime("-fa", "off", "-fa", "-1") == runtime()  # the last one counts; -1 is auto
    assert not runtime("-fa", "false").flash_attn


def test_kv_cache_follows_shape_context_and_type(big_shape: ModelShape) -> None:
    f16 = Runtime(ctx=32768)
    assert kv_bytes(big_shape, f16, 0) == 32768 * 8 * (128 + 128) * 2  # 128 MiB per layer
    q8 = Runtime(ctx=32768, cache_type_k="q8_0", cache_type_v="q8_0")
    assert kv_bytes(big_shape, q8, 0) == 32768 * 8 * (128 + 128) * 34 // 32
    assert kv_bytes(big_shape, Runtime(ctx=1000), 0) == 1024 * 8 * 256 * 2  # padded to 256 cells


# ---- split ------------------------------------------------------------------------------------------


def test_layer_counts_as_a_split_reproduce_themselves() -> None:
    # The planner writes layer counts; llama.cpp's cumulative-fraction rule must give them back.
    for counts in ([41, 40], [21, 21, 21, 18], [1, 80], [50, 30, 1], [7, 1]):
        assert counts_from_split(counts, sum(counts)) == counts
    assert counts_from_split([3, 1], 5) == [4, 1]  # seen with -ts 3,1 on 4 layers + output (REFERENCE.md)


# ---- choice -----------------------------------------------------------------------------------------


def test_one_gpu_when_it_fits(mid_shape: ModelShape) -> None:
    p = plan(mid_shape, [gpu(0, 24), gpu(1, 80)])
    assert p.fits
    assert [d.gpu for d in p.devices] == [1]
    assert p.tensor_split == []
    assert p.gpu_layers == 101


def test_mixed_24_and_16_fits_where_an_equal_split_would_not(mid_shape: ModelShape) -> None:
    gpus = [gpu(0, 24, name="RTX 3090"), gpu(1, 16, name="RTX 4080")]
    p = plan(mid_shape, gpus)
    assert p.fits
    assert_within_room(p)
    assert [d.gpu for d in p.devices] == [0, 1]
    assert p.tensor_split[0] > p.tensor_split[1]
    equal = plan(mid_shape, gpus, tensor_split=[1, 1], gpus=[0, 1])
    assert not equal.fits  # half of 18 GiB and more does not go on a 16 GB card with its margin


def test_three_unequal_gpus(big_shape: ModelShape) -> None:
    p = plan(big_shape, [gpu(0, 48), gpu(1, 24), gpu(2, 16)], ctx=4096)
    assert p.fits
    assert_within_room(p)
    layers = [d.layers for d in p.devices]
    assert layers[0] > layers[1] > layers[2]
    assert sum(layers) == 80 and p.devices[-1].output_layer


def test_reserve_and_foreign_usage_shrink_the_room(mid_shape: ModelShape) -> None:
    settings = GpuSettings(reserve_mib={0: 2048}, margin_mib=1024)
    p = plan(mid_shape, [gpu(0, 24), gpu(1, 24, used_gib=12)], settings=settings, ctx=4096)
    assert p.fits
    assert_within_room(p)
    rooms = {d.gpu: d.usable_mib for d in p.devices}
    assert rooms.get(0, 24 * GIB - 1024 - 2048) == 24 * GIB - 1024 - 2048
    assert rooms.get(1, 12 * GIB - 1024) == 12 * GIB - 1024


def test_directly_linked_gpus_are_preferred(big_shape: ModelShape) -> None:
    gpus = [gpu(0, 48), gpu(1, 48), gpu(2, 48)]
    links = {(0, 1): Link.CROSS_CPU, (0, 2): Link.CROSS_CPU, (1, 2): Link.NVLINK}
    p = plan(big_shape, gpus, links=links, ctx=4096)
    assert [d.gpu for d in p.devices] == [1, 2]


def test_other_instances_claims_are_not_used_again(small_shape: ModelShape) -> None:
    # Free memory says 24 GiB (the other server has not allocated yet), but 20 GiB are claimed.
    p = plan(small_shape, [gpu(0, 24), gpu(1, 24)], claims={0: 20 * GIB})
    assert [d.gpu for d in p.devices] == [1]


def test_explicit_gpus_and_split_are_honoured(big_shape: ModelShape) -> None:
    gpus = [gpu(0, 80), gpu(1, 80), gpu(2, 80)]
    p = plan(big_shape, gpus, gpus=[2, 0], tensor_split=[3, 1], ctx=4096)
    assert p.fits
    assert [d.gpu for d in p.devices] == [2, 0]
    assert [d.layers for d in p.devices] == [61, 19]  # 81 units by 3:1, the output on the last


# ---- the same choice, found with less work -----------------------------------------------------------


def every_set(
    shape: ModelShape,
    runtime: Runtime,
    rooms: list[UsableGpu],
    links: dict[tuple[int, int], Link],
    overhead_b: int = 512 * MIB,
) -> Layout | None:
    """fewest_gpus as it was: every set of every size, best first, each placed."""
    usable = [r for r in rooms if r.usable_mib > 0]
    for size in range(1, len(usable) + 1):
        for group in candidate_sets(usable, size, links):
            found = balanced(shape, runtime, group, shape.n_layer + 1, overhead_b)
            if found is not None:
                return found
    return None


def choices(shape: ModelShape, rooms: list[UsableGpu], links: dict[tuple[int, int], Link]) -> list[list[int] | None]:
    """The GPUs fewest_gpus picks at a range of contexts, checked against every_set's whole choice."""
    picked: list[list[int] | None] = []
    for ctx in (2048, 8192, 32768, 131072, 400000):
        runtime = Runtime(ctx=ctx)
        expected = every_set(shape, runtime, rooms, links)
        assert fewest_gpus(shape, runtime, rooms, links, 512 * MIB) == expected, ctx  # same GPUs, same split
        assert holds(shape, runtime, rooms, 512 * MIB) == (expected is not None), ctx
        picked.append(None if expected is None else [d.gpu for d in expected.devices])
    return picked


def rooms_of(*usable_gib: float) -> list[UsableGpu]:
    return [UsableGpu(i, f"GPU-{i}", "GPU", 80 * GIB, int(gib * GIB)) for i, gib in enumerate(usable_gib)]


def test_identical_gpus_get_the_same_choice(big_shape: ModelShape) -> None:
    mesh = {(i, j): Link.NVLINK for i in range(4, 8) for j in range(i + 1, 8)}  # 4-7 linked, 0-3 via the CPU
    four, six = [4, 5, 6, 7], [0, 1, 2, 3, 4, 5]
    assert choices(big_shape, rooms_of(*[23] * 8), mesh) == [four, four, four, six, None]
    # The refusal's "it would fit on N GPUs like it": N clones, no links.
    assert choices(big_shape, rooms_of(*[23] * 10), {})[-1] == list(range(10))


def test_mixed_gpus_get_the_same_choice(big_shape: ModelShape, mid_shape: ModelShape) -> None:
    mixed = rooms_of(15, 47, 23, 0.25, 23, 15, 79, 11)  # one too small to hold even its driver's overhead
    links = {(1, 4): Link.NVLINK, (2, 4): Link.SWITCH, (2, 5): Link.NVLINK, (0, 7): Link.XGMI, (3, 6): Link.BOARD}
    assert choices(big_shape, mixed, links) == [[6], [6], [1, 6], [1, 6], None]
    assert choices(mid_shape, mixed, links) == [[6], [6], [6], [6], [0, 1, 2, 4, 5, 6]]
    pairs = {(0, 2): Link.NVLINK, (3, 5): Link.NVLINK}  # equal sizes, but only some sets directly linked
    assert choices(mid_shape, rooms_of(15, 23, 15, 23, 15, 23), pairs) == [[3, 5], [3, 5], [3, 5], [0, 1, 3, 5], None]


def test_a_model_that_only_just_fits_is_still_found(small_shape: ModelShape) -> None:
    # Sizes are skipped by what their GPUs could hold at most, less each GPU's overhead: with a large overhead,
    # counting it once too often would skip the size where the model only just fits.
    runtime, overhead_b = Runtime(ctx=8192), 4 * GIB * MIB
    low, high = 1, 40 * GIB  # the smallest room on which three GPUs hold the model, the old way
    while low < high:
        middle = (low + high) // 2
        if every_set(small_shape, runtime, rooms_of(*[middle / GIB] * 3), {}, overhead_b) is None:
            low = middle + 1
        else:
            high = middle
    for usable_mib in (high, high - 1):
        rooms = rooms_of(*[usable_mib / GIB] * 3)
        expected = every_set(small_shape, runtime, rooms, {}, overhead_b)
        assert fewest_gpus(small_shape, runtime, rooms, {}, overhead_b) == expected
        assert holds(small_shape, runtime, rooms, overhead_b) == (expected is not None)
    assert fewest_gpus(small_shape, runtime, rooms_of(*[high / GIB] * 3), {}, overhead_b) is not None


# ---- does not fit -----------------------------------------------------------------------------------


def test_does_not_fit_says_why_and_what_would(big_shape: ModelShape) -> None:
    p = plan(big_shape, [gpu(0, 24), gpu(1, 24)], ctx=32768)
    assert not p.fits
    assert p.reason is not None
    assert p.reason.startswith("m needs ")
    assert "on 2 GPUs (weights 69.0 GiB, KV cache 10.0 GiB" in p.reason
    assert p.reason.endswith("but only 46.0 GiB is usable there")  # 2 x (24 GiB - 1 GiB margin)
    text = "\n".join(p.suggestions)
    assert "q8_0 KV cache" in text and "saves 4.7 GiB" in text
    assert "it would fit on 4 GPUs of 24 GiB" in text
    assert "with allow_cpu_offload: true, " in text


def test_the_largest_context_that_fits(small_shape: ModelShape) -> None:
    p = plan(small_shape, [gpu(0, 24)], ctx=131072)
    assert not p.fits
    [ctx_hint] = [s for s in p.suggestions if s.startswith("the largest context")]
    best = int(ctx_hint.split()[-1].rstrip(")"))
    assert plan(small_shape, [gpu(0, 24)], ctx=best).fits
    assert not plan(small_shape, [gpu(0, 24)], ctx=best + 256).fits


def test_partial_offload_when_allowed(big_shape: ModelShape) -> None:
    p = plan(big_shape, [gpu(0, 24), gpu(1, 24)], ctx=4096, allow_cpu_offload=True)
    assert p.fits
    assert_within_room(p)
    on_gpus = sum(d.layers for d in p.devices)
    assert p.gpu_layers == on_gpus < 80
    assert not any(d.output_layer for d in p.devices)
    assert p.host.weights_mib > (80 - on_gpus) * 800  # the CPU's layers are in host memory
    assert any("partial offload" in s for s in p.suggestions)


def test_no_gpu_means_everything_on_the_host(mid_shape: ModelShape) -> None:
    p = plan(mid_shape, [])
    assert p.fits and p.devices == [] and p.gpu_layers == 0
    assert p.host.weights_mib > 17 * GIB
