"""`split_mode`: llama.cpp's `-sm tensor` rules per device (src/llama-model.cpp,
llama_meta_device_get_split_state), `auto`'s choice from the links, the fallbacks, the command, and the plan
against a real llama-server over two RPC devices, each rpc-server's own allocations being the exact figure
(llama-server's `Meta()` lines give the largest device's buffer, not a total:
ggml/src/ggml-backend-meta.cpp, ggml_backend_meta_buffer_type_alloc_buffer_n, sizes it as the max)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from bench.realbuffers import Allocated, allocations, buffer_sizes, free_port, measure_argv, rpc_servers
from launcher.backends.llama_server import LlamaServerBackend, find_llama_server
from launcher.cli_output import format_plan
from launcher.config_gpus import GpuSettings, SimGpu
from launcher.config_model import ModelSettings
from launcher.errors import StartError
from launcher.gpu.sampler import read_sample
from launcher.gpu.sim import SimBackend
from launcher.gpu.types import Link
from launcher.plan.estimate import MIB
from launcher.plan.gguf import TensorInfo
from launcher.plan.placement import Placement
from launcher.plan.planner import Placed, Planner
from launcher.plan.split_modes import Heads, SplitMode, choose, slices, tensor_split
from launcher.plan.tensor_plan import UNSIZED_RECURRENT
from launcher.tinymodel import TinyShape, write_tiny_llama
from tests import archcorpus
from tests.archmodels import write_gemma3, write_mamba, write_qwen3moe
from tests.conftest import MARK

F16, Q8_0 = 1, 8
# 4 layers, GQA 8/4 heads of 64, q8_0: 7 MiB of weights per device, the KV cache the larger part at 32k.
TINY = TinyShape(n_layer=4, n_embd=512, n_head=8, n_head_kv=4, n_ff=1536, weight_type="q8_0", extra_tokens=2000)
# 12 heads over 4 KV heads on 3 devices: 1, 1 and 2 KV heads per layer, the pair rotating (even over 6 layers).
UNEVEN = TinyShape(n_layer=6, n_embd=768, n_head=12, n_head_kv=4, n_ff=1536, weight_type="q8_0", extra_tokens=2000)


# ---- the rules, against llama.cpp's arithmetic worked by hand ------------------------------------------


def test_slices_round_down_to_the_granularity_and_rotate() -> None:
    assert slices(2259, 1, 0, [0.0, 0.0]) == [1129, 1130]  # output rows: the last device takes the rest
    assert slices(2259, 1, 1, [0.0, 0.0]) == [1130, 1129]  # rotated: the leftover moves
    assert slices(512, 128, 0, [0.0] * 3) == [128, 128, 256]  # 170 -> 128, 341 -> 256
    assert slices(512, 128, 1, [0.0] * 3) == [256, 128, 128]
    assert slices(1536, 128, 0, [3.0, 1.0]) == [1152, 384]  # -ts 3,1


def test_uneven_heads_give_one_device_two_of_a_layers_four_kv_heads() -> None:
    """12 heads over 4 KV heads of 64, f16, 3 devices: the block (1) doubles while x 3 stays under
    n_embd_q = 3 x 64, to 64; granularity_q = lcm(192, 64) = 192, K's 64 (one KV head): 256 K columns split
    64 / 64 / 128 (85 and 170 rounded down), the larger share rotating from layer to layer."""
    heads = [Heads(12, 4, 64, 64)] * 3
    tensors = [
        TensorInfo(f"blk.{il}.{name}", shape, F16, shape[0] * shape[1] * 2)
        for il in range(3)
        for name, shape in (("attn_k.weight", (768, 256)), ("attn_output.weight", (768, 768)))
    ]
    split = tensor_split(tensors, heads, [(False, False)] * 3, [0.0] * 3)
    assert split.kv_fraction == ((0.25, 0.25, 0.5), (0.5, 0.25, 0.25), (0.25, 0.5, 0.25))
    # attn_output's 768 rows in whole heads (192): 192 / 192 / 384, rotated alike; over the three layers
    # each device holds 64 + 64 + 128 K columns and 192 + 192 + 384 output rows, of 768 x 2 bytes each
    assert split.weights_b == ((256 + 768) * 768 * 2,) * 3


def test_mirrored_tensors_are_whole_on_every_device_and_embeddings_stay_on_the_host() -> None:
    embd = TensorInfo("token_embd.weight", (64, 300), F16, 64 * 300 * 2)
    tensors = [
        embd,
        TensorInfo("output_norm.weight", (64,), 0, 256),
        TensorInfo("blk.0.attn_norm.weight", (64,), 0, 256),
        TensorInfo("blk.0.ffn_down.weight", (256, 64), Q8_0, 256 * 64 * 34 // 32),
    ]
    output = TensorInfo("output.weight", (64, 300), F16, 64 * 300 * 2)
    down = 256 * 64 * 34 // 32 // 2  # ffn_down along ne[0] in steps of lcm(32, 128): 128 and 128
    rows = (150 * 64 * 2,) * 2  # output.weight by vocabulary rows, 150 each
    split = tensor_split([*tensors, output], [Heads(4, 2, 16, 16)], [(False, False)], [0.0, 0.0])
    assert split.weights_b == tuple(512 + down + r for r in rows)
    tied = tensor_split(tensors, [Heads(4, 2, 16, 16)], [(False, False)], [0.0, 0.0])
    assert tied.weights_b == (512 + down + embd.n_bytes,) * 2  # the tied output's copy: whole on each


# ---- auto and the fallbacks ----------------------------------------------------------------------------


def test_auto_takes_tensor_over_directly_linked_gpus_and_layer_through_the_cpu() -> None:
    linked = choose("auto", "llama", "llama-server", [0, 1], {(0, 1): Link.NVLINK}, remote=False)
    assert (linked.mode, linked.reason) == (SplitMode.TENSOR, "tensor: GPUs 0 and 1 are nvlink-linked")
    apart = choose("auto", "llama", "llama-server", [0, 1], {(0, 1): Link.CPU}, remote=False)
    assert (apart.mode, apart.reason) == (SplitMode.LAYER, "layer: GPUs 0 and 1 are joined only through the CPU")
    assert apart.warning is None
    one = choose("auto", "llama", "llama-server", [0], {}, remote=False)
    assert one.mode is SplitMode.LAYER
    peers = choose("auto", "llama", "llama-server", [0], {}, remote=True)
    assert (peers.mode, peers.reason) == (SplitMode.LAYER, "layer: some devices are on other hosts")


def test_what_llama_cpp_cannot_run_falls_back_to_layer_with_a_warning() -> None:
    links = {(0, 1): Link.NVLINK}
    mamba = choose("auto", "mamba", "llama-server", [0, 1], links, remote=False)
    assert mamba.mode is SplitMode.LAYER and "llm_arch_supports_sm_tensor" in mamba.reason
    row = choose("row", "llama", "llama-server", [0, 1], links, remote=False)
    assert row.mode is SplitMode.LAYER and row.warning is not None and "split buffer" in row.warning
    ollama = choose("tensor", "llama", "ollama", [0, 1], links, remote=False)
    assert ollama.mode is SplitMode.LAYER and ollama.warning == "split_mode: ollama has no tensor split"
    segmented = choose("tensor", "qwen3next", "llama-server", [0, 1], links, remote=False)
    assert segmented.mode is SplitMode.LAYER and "get_split_segments" in str(segmented.warning)
    asked = choose("tensor", "llama", "llama-server", [0, 1], {(0, 1): Link.CPU}, remote=False)
    assert (asked.mode, asked.warning) == (SplitMode.TENSOR, None)  # as configured, links or not


def place(model: ModelSettings, memory_mib: int | Sequence[int], link_group: str | None, count: int = 2) -> Placed:
    """The launcher's plan for ``model`` on ``count`` simulated GPUs of ``memory_mib`` (or one GPU per size
    given), in ``link_group``."""
    sizes = [memory_mib] * count if isinstance(memory_mib, int) else list(memory_mib)
    settings = GpuSettings(
        backend="sim",
        margin_mib=0,
        overhead_mib=0,
        sim=[SimGpu(name="sim", memory_mib=size, link_group=link_group) for size in sizes],
    )
    gpus = SimBackend(settings.sim)
    samples = [read_sample(gpus, gpu, processes=False) for gpu in gpus.identities()]
    assert isinstance(model.model, Path)
    return Planner(settings, gpus.identities(), gpus.links()).place("m", model, model.model, samples, {})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "m.gguf", TINY)


def test_auto_on_simulated_gpus_with_and_without_a_link_group(tiny: Path) -> None:
    model = ModelSettings(model=tiny, ctx=32768, args=["-ub", "64"])  # 128 MiB of KV: one 90 MiB GPU is short
    linked = place(model, 90, "nv").plan
    assert (linked.split_mode, linked.split_reason) == ("tensor", "tensor: GPUs 0 and 1 are nvlink-linked")
    assert [d.layers for d in linked.devices] == [4, 4] and linked.flash_attn
    assert [d.kv_cache_mib for d in linked.devices] == [64, 64]  # the KV heads halved, every cell on both
    apart = place(model, 90, None).plan
    assert (apart.split_mode, apart.split_reason) == ("layer", "layer: GPUs 0 and 1 are joined only through the CPU")
    assert sum(d.layers for d in apart.devices) == 4
    forced = place(model.model_copy(update={"split_mode": "layer"}), 90, "nv").plan
    assert forced.split_mode == "layer"
    shown = format_plan("m", linked).splitlines()
    assert "split mode: tensor: GPUs 0 and 1 are nvlink-linked" in shown
    assert "tensor split: 1,1 (shares of every tensor per GPU)" in shown


def test_a_refusal_considers_the_tensor_split_first(tiny: Path) -> None:
    """At 80 MiB per GPU the pipeline's two compute buffers leave no room; the tensor split (77 MiB each)
    fits: taken over linked GPUs, named in the refusal's suggestions over GPUs joined through the CPU."""
    model = ModelSettings(model=tiny, ctx=32768, args=["-ub", "64"])
    linked = place(model, 80, "nv").plan
    assert (linked.split_mode, [d.total_mib for d in linked.devices]) == ("tensor", [77, 77])
    with pytest.raises(StartError) as refused:
        place(model, 80, None)
    assert "it fits with split_mode: tensor on GPUs 0,1" in str(refused.value.hint)


def test_the_command_carries_the_mode_the_split_and_flash_attention(tiny: Path) -> None:
    model = ModelSettings(model=tiny, ctx=32768, args=["-ub", "64"])
    placed = place(model, 90, "nv")
    assert placed.placement.split_mode == "tensor"
    argv = LlamaServerBackend(model).launch_spec(model, 8080, placed.placement).argv
    assert argv[argv.index("--split-mode") + 1] == "tensor"
    assert argv[argv.index("--tensor-split") + 1] == "1,1"
    assert argv[argv.index("--flash-attn") + 1] == "on"
    layer = LlamaServerBackend(model).launch_spec(model, 8080, Placement(gpu_layers=5, tensor_split=(2, 3))).argv
    assert "--flash-attn" not in layer and layer[layer.index("--split-mode") + 1] == "layer"


# ---- against a real llama-server over two RPC devices --------------------------------------------------


def write_model(kind: str, path: Path) -> Path:
    if kind == "gemma3":  # sliding window (512) on five layers of six, tied output
        return write_gemma3(path, 12, 512, 2048, (512, 4, 2, 64, 4096))
    if kind == "qwen3moe":  # 8 experts
        return write_qwen3moe(path, 6, 2048, 1024)
    return write_tiny_llama(path, TINY if kind == "llama" else UNEVEN)


@pytest.mark.parametrize(
    ("kind", "memory_mib", "shares"),
    [
        ("llama", [90, 90], [1, 1]),
        ("uneven", [96, 96, 96], [1, 1, 1]),
        ("gemma3", [200, 200], [1, 1]),
        ("qwen3moe", [300, 300], [1, 1]),
        # unequal GPUs: -ts from each one's room once the mirrored weights and compute buffer are set aside
        ("llama", [60, 120], [1, 2.1]),
        ("uneven", [80, 100, 140], [1, 1.26, 1.8]),
        ("gemma3", [100, 200], [1, 2.1]),
        ("qwen3moe", [200, 400], [1, 2.03]),
    ],
)
def test_each_rpc_device_holds_its_planned_slice(
    kind: str,
    memory_mib: list[int],
    shares: list[float],
    tmp_path: Path,
    leaves_no_process: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(MARK, leaves_no_process)
    path = write_model(kind, tmp_path / "m.gguf")
    model = ModelSettings(model=path, ctx=32768, args=["-ub", "64", "-lv", "4"])
    devices = len(memory_mib)
    placed = place(model, memory_mib, "nv")
    assert (placed.plan.split_mode, len(placed.plan.devices)) == ("tensor", devices)
    assert placed.plan.tensor_split == shares
    check_on_rpc_devices(model, placed, tmp_path)


def check_on_rpc_devices(model: ModelSettings, placed: Placed, tmp_path: Path) -> list[Allocated]:
    """Run the plan's command over one logging rpc-server per planned device: each device's allocations
    against the plan, within the planner's targets (weights exact but for the MiB rounding)."""
    port = free_port()
    spec = LlamaServerBackend(model).launch_spec(model, port, placed.placement)
    assert spec.argv[0] == str(find_llama_server(None))
    devices = len(placed.plan.devices)
    with rpc_servers(Path(spec.argv[0]).parent, devices, logs=tmp_path) as addresses:
        reported = measure_argv([*spec.argv, "--rpc", ",".join(addresses)], port, spec.env)
    allocated = allocations(tmp_path, devices)
    for device, real in zip(placed.plan.devices, allocated, strict=True):
        assert device.weights_mib == -(-real.weights_b // MIB)  # the rules are exact: only the MiB rounding
        assert device.kv_cache_mib * MIB == pytest.approx(real.kv_b, rel=0.02, abs=MIB)
        assert abs(device.compute_mib * MIB - real.compute_b) <= 32 * MIB  # the whole graph's, on each device
        planned = (device.weights_mib + device.kv_cache_mib + device.compute_mib) * MIB
        assert abs(planned - real.total_b) <= max(0.03 * real.total_b, 32 * MIB)
    assert reported.host.model == pytest.approx(placed.plan.host.weights_mib, abs=1.0)  # token_embd
    return allocated


@pytest.mark.parametrize(
    ("kind", "mode", "ctx", "memory_mib", "message"),
    [
        ("llama", "row", 32768, 90, "does not support split buffers"),
        ("mamba", "tensor", 4096, 10, "LLAMA_SPLIT_MODE_TENSOR not implemented for architecture 'mamba'"),
        # DeepSeek's MLA: a KV cache of latents, no heads to divide
        ("deepseek2", "tensor", 4096, 16, "LLAMA_SPLIT_MODE_TENSOR not implemented for architecture 'deepseek2'"),
    ],
)
def test_what_the_plan_refuses_fails_at_load_as_the_rule_says(
    kind: str,
    mode: str,
    ctx: int,
    memory_mib: int,
    message: str,
    tmp_path: Path,
    leaves_no_process: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Why `row` and a tensor split of Mamba are planned as `layer`: the pinned llama.cpp's RPC (like its
    CUDA) backend has no split buffer type, and its tensor mode has no rule for Mamba's graph."""
    monkeypatch.setenv(MARK, leaves_no_process)
    if kind == "deepseek2":
        path = archcorpus.write_all(tmp_path, names=(kind,))[kind]
    elif kind == "mamba":
        path = write_mamba(tmp_path / "m.gguf", 6, 2048, 256)
    else:
        path = write_model(kind, tmp_path / "m.gguf")
    model = ModelSettings(model=path, ctx=ctx, split_mode=mode, args=["-ub", "64"])  # type: ignore[arg-type]
    plan = place(model, memory_mib, "nv").plan  # two GPUs needed: the mode would apply
    assert (len(plan.devices), plan.split_mode) == (2, "layer")
    assert plan.warnings == [f"split_mode: {plan.split_reason.split('(', 1)[1][:-1]}"]
    server = find_llama_server(None)
    with rpc_servers(server.parent, 2) as addresses:
        argv = [str(server), "-m", str(path), "--rpc", ",".join(addresses), "-sm", mode, "-ngl", "99", "--fit", "off"]
        argv += ["--port", str(free_port()), "--host", "127.0.0.1"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert message in done.stdout + done.stderr


def test_shared_experts_and_the_router_are_mirrored_the_experts_split() -> None:
    """ffn_*_shexp match none of get_tensor_config's FFN patterns (outside DeepSeek-V4): whole on each."""
    experts = TensorInfo("blk.0.ffn_up_exps.weight", (64, 256, 8), F16, 64 * 256 * 8 * 2)
    shared = TensorInfo("blk.0.ffn_up_shexp.weight", (64, 256), F16, 64 * 256 * 2)
    router = TensorInfo("blk.0.ffn_gate_inp.weight", (64, 8), 0, 64 * 8 * 4)
    split = tensor_split([experts, shared, router], [Heads(4, 2, 16, 16)], [(False, False)], [0.0, 0.0])
    assert split.weights_b == (experts.n_bytes // 2 + shared.n_bytes + router.n_bytes,) * 2


def test_more_devices_than_the_meta_device_takes_stay_layered() -> None:
    gpus = list(range(17))
    links = {(a, b): Link.NVLINK for a in gpus for b in gpus if a < b}
    found = choose("tensor", "llama", "llama-server", gpus, links, remote=False)
    assert found.mode is SplitMode.LAYER and "GGML_BACKEND_META_MAX_DEVICES" in str(found.warning)
    assert choose("auto", "llama", "llama-server", gpus[:16], links, remote=False).mode is SplitMode.TENSOR


def test_layer_counts_in_tensor_split_keep_the_layer_split(tiny: Path) -> None:
    model = ModelSettings(model=tiny, ctx=32768, args=["-ub", "64"], gpus=[0, 1], tensor_split=[1, 1])
    plan = place(model.model_copy(update={"split_mode": "tensor"}), 200, "nv").plan
    assert plan.split_mode == "layer"
    assert plan.warnings == ["split_mode: tensor ignored: tensor_split gives layers per GPU"]


# ---- ctx: max sizes the tensor split -------------------------------------------------------------------


def test_ctx_max_sizes_the_context_of_the_tensor_split(tiny: Path) -> None:
    """The bisection lays out the tensor split at each step on the GPUs chosen at ctx_min: every GPU holds
    half the KV heads and one compute buffer, so two linked 90 MiB GPUs hold 39168 cells where a layer
    split holds 32768; the next step overflows a GPU by the tensor plan's own numbers."""
    model = ModelSettings(model=tiny, ctx="max", ctx_min=32768, ctx_max=131072, args=["-ub", "64"])
    plan = place(model, 90, "nv").plan
    assert (plan.split_mode, plan.ctx, [d.total_mib for d in plan.devices]) == ("tensor", 39168, [90, 90])
    assert plan.context is not None
    assert plan.context.reason.endswith("ctx 39424 would need 91 MiB on GPU 1 with this split, 90 MiB usable there")
    assert place(model, 90, None).plan.ctx == 32768  # joined through the CPU: layers
    with pytest.raises(StartError):  # the next step, planned with a fixed context, fits in no mode
        place(model.model_copy(update={"ctx": 39424, "split_mode": "tensor"}), 90, "nv")


def test_ctx_max_of_a_tensor_split_over_unequal_rpc_devices_is_held(
    tiny: Path, tmp_path: Path, leaves_no_process: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The context chosen over a 60 and a 120 MiB GPU (shares 1 : 2.1) runs over two RPC devices, each
    holding what its plan says and no more than its GPU's memory."""
    monkeypatch.setenv(MARK, leaves_no_process)
    model = ModelSettings(model=tiny, ctx="max", ctx_min=32768, ctx_max=131072, args=["-ub", "64", "-lv", "4"])
    placed = place(model, [60, 120], "nv")
    assert (placed.plan.split_mode, placed.plan.ctx, placed.plan.tensor_split) == ("tensor", 33792, [1, 2.1])
    allocated = check_on_rpc_devices(model, placed, tmp_path)
    assert [real.total_b <= size * MIB for real, size in zip(allocated, [60, 120], strict=True)] == [True, True]


def test_attention_sinks_and_ffn_biases_split_as_llama_cpp_splits_them() -> None:
    """gpt-oss's attn_sinks (one f32 per head) go with the heads (granularity_q / head_k = 4 of 8 heads
    each); an FFN bias in steps of lcm(ffn_down's block, 128), not element by element: 384 rows as 128
    and 256 on two devices (192 rounded down, the last taking the rest)."""
    heads = [Heads(8, 2, 64, 64)]
    sinks = TensorInfo("blk.0.attn_sinks.weight", (8,), 0, 8 * 4)
    out = TensorInfo("blk.0.attn_output.weight", (512, 512), F16, 512 * 512 * 2)
    bias = TensorInfo("blk.0.ffn_up.bias", (384,), 0, 384 * 4)
    down = TensorInfo("blk.0.ffn_down.weight", (384, 512), F16, 384 * 512 * 2)
    split = tensor_split([sinks, out, bias, down], heads, [(False, False)], [0.0, 0.0])
    halves = (sinks.n_bytes + out.n_bytes) // 2
    assert split.weights_b == (halves + 128 * 4 + 128 * 512 * 2, halves + 256 * 4 + 256 * 512 * 2)
    assert split.mirrored_b == 0


def test_the_projector_goes_whole_on_the_first_device_of_a_tensor_split(
    tmp_path: Path, leaves_no_process: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mtmd does not use the Meta device: clip_ctx (tools/mtmd/clip.cpp) takes --device's first entry or
    else the first GPU-type device registered (common/arg.cpp, ggml_backend_dev_by_type), so the projector's
    weights sit whole on the split's first device, as the plan puts them, and none on the others."""
    monkeypatch.setenv(MARK, leaves_no_process)
    files = archcorpus.write_all(tmp_path, names=("gemma3", "mmproj"), scale=8)
    args = ["-ub", "64", "--mmproj", str(files["mmproj"]), "-lv", "4"]
    model = ModelSettings(model=files["gemma3"], ctx=4096, split_mode="tensor", args=args)
    placed = place(model, 300, "nv")
    assert placed.plan.split_mode == "tensor"
    assert [d.projector_mib for d in placed.plan.devices] == [38, 0]
    port = free_port()
    spec = LlamaServerBackend(model).launch_spec(model, port, placed.placement)
    with rpc_servers(Path(spec.argv[0]).parent, 2, logs=tmp_path) as addresses:
        reported = measure_argv([*spec.argv, "--rpc", ",".join(addresses)], port, spec.env)
    assert f"CLIP using RPC0[{addresses[0]}] backend" in reported.log
    first, second = ([-(-size // MIB) for size in buffer_sizes(tmp_path / f"rpc{i}.log")] for i in range(2))
    assert 38 in first and 38 not in second  # the projector's weights, 37.75 MiB


@pytest.mark.parametrize("kind", ["rwkv7", "lfm2"])
def test_recurrent_layers_llama_cpp_splits_are_refused_at_plan_time(kind: str, tmp_path: Path) -> None:
    """RWKV and LFM2 run in llama.cpp's tensor mode, but their recurrent layers split by rules the planner
    does not size: the plan stays layered with the reason (it once divided by their zero KV heads)."""
    path = archcorpus.write_all(tmp_path, names=(kind,))[kind]
    model = ModelSettings(model=path, ctx=4096, split_mode="tensor", args=["-ub", "64"])
    plan = place(model, 12, "nv").plan
    assert (len(plan.devices), plan.split_mode) == (2, "layer")
    assert plan.warnings == [f"split_mode: {UNSIZED_RECURRENT}"]
    assert place(model.model_copy(update={"split_mode": "auto"}), 12, "nv").plan.split_mode == "layer"
