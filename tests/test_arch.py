"""The planner's per-architecture rules (launcher/plan/arch.py and the KV arithmetic in estimate.py), each
number worked out by hand from llama.cpp's formulas, and plans of generated headers of those architectures."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.cli_output import format_plan
from launcher.config_gpus import GpuSettings
from launcher.config_model import ModelSettings
from launcher.plan.arch import RULES, StateWidths, kv_layers, recurrent_layers, rule_of, sliding_window, state_widths
from launcher.plan.estimate import MIB, ModelShape, Runtime, context_cells, kv_bytes, window_cells
from launcher.plan.gguf import read_gguf
from launcher.plan.model_plan import make_plan
from launcher.plan.planner import projector_bytes
from launcher.plan.runtime import not_modelled, runtime_for
from launcher.tinymodel import TinyShape, write_tiny_llama
from tests.archmodels import write_gemma3, write_mamba, write_qwen3moe, write_unknown_architecture
from tests.test_planner import gpu, plan

# ---- which layers slide, and over how many tokens ---------------------------------------------------


def swa(arch: str, n_layer: int, window: int | None, pattern: object = None) -> tuple[int, list[int]]:
    n_swa, layers = sliding_window(RULES[arch], n_layer, window, pattern)
    return n_swa, sorted(set(range(n_layer)) - layers)  # the global (full-context) layers read easier


def test_sliding_window_patterns_from_load_hparams() -> None:
    # set_swa_pattern(n): layer il slides unless il % n == n - 1.
    assert swa("gemma3", 12, 1024) == (1024, [5, 11])  # every sixth global
    assert swa("gemma2", 6, None) == (4096, [1, 3, 5])  # alternating; 4096 when the file has no window
    assert swa("gpt-oss", 4, 128) == (128, [1, 3])
    assert swa("cohere2", 8, 4096) == (4096, [3, 7])
    assert swa("olmo2", 8, 4096) == (4096, [3, 7])
    assert swa("exaone4", 64, None)[1] == list(range(3, 64, 4))  # the 32B: every fourth global, window 4096
    assert swa("exaone4", 64, None)[0] == 4096
    assert swa("llama4", 8, 4096) == (8192, [3, 7])  # chunked attention, 8192 whatever the file says
    assert swa("smallthinker", 8, 1) == (4096, [0, 4])  # dense first: il % 4 == 0 global


@pytest.mark.parametrize(
    ("arch", "n_layer", "window"),
    [
        ("gemma3", 12, None),  # Gemma 3 without a window (the 270M) is all global
        ("gemma3", 12, 0),
        ("exaone4", 30, 4096),  # EXAONE 4 1.2B: no sliding window, only the 32B has one
        ("llama4", 8, 0),  # a 0 window turns Llama 4's chunks off
        ("llama", 32, 4096),  # Mistral 7B v0.1's file has one; llama.cpp attends over the whole context
        ("qwen2", 28, 32768),
        ("phi3", 32, 2047),  # switched off in llama.cpp (PR 13676)
    ],
)
def test_no_sliding_window_where_llama_cpp_has_none(arch: str, n_layer: int, window: int | None) -> None:
    assert sliding_window(RULES[arch], n_layer, window, None) == (0, frozenset())


def test_the_files_pattern_wins_over_the_architectures() -> None:
    assert swa("cohere2", 6, 4096, 3) == (4096, [2, 5])  # a period
    assert swa("gemma3", 4, 512, [True, False, False, True]) == (512, [1, 2])  # a flag per layer
    assert swa("mimo2", 3, 128, [False, True, True]) == (128, [0])  # only the file says which


# ---- recurrent layers, layers without KV, state sizes ------------------------------------------------


def test_recurrent_layers() -> None:
    kv, ff = [0, 0, 0, 8, 0, 0, 0, 8], [1] * 8
    assert recurrent_layers(RULES["jamba"], 8, kv, ff, None) == {0, 1, 2, 4, 5, 6}  # n_head_kv == 0
    nemotron_ff = [0, 0, 5, 0, 0, 0, 5, 0]  # Nemotron-H: its MLP-only layers have neither heads nor state
    assert recurrent_layers(RULES["nemotron_h"], 8, kv, nemotron_ff, None) == {0, 1, 4, 5}
    assert recurrent_layers(RULES["qwen3next"], 8, kv, ff, None) == {0, 1, 2, 4, 5, 6}  # (il + 1) % 4 != 0
    assert recurrent_layers(RULES["qwen35"], 6, kv, ff, 3) == {0, 1, 3, 4}  # full_attention_interval 3
    assert recurrent_layers(RULES["mamba"], 3, kv, ff, None) == {0, 1, 2}
    assert recurrent_layers(RULES["llama"], 3, kv, ff, None) == frozenset()


def test_layers_with_a_kv_cache() -> None:
    assert kv_layers(RULES["gemma3n"], 30, frozenset(), 0) == frozenset(range(20))  # later layers reuse them
    assert kv_layers(RULES["glm4moe"], 47, frozenset(), 1) == frozenset(range(46))  # not the NextN layer
    assert kv_layers(RULES["jamba"], 4, frozenset({0, 2}), 0) == {1, 3}
    assert kv_layers(RULES["falcon-h1"], 3, frozenset({0, 1, 2}), 0) == {0, 1, 2}  # both kinds on every layer


def test_recurrent_state_widths() -> None:
    # Mamba: R = (d_conv - 1) x (d_inner + 2 n_group d_state) = 3 x 5120; S = d_state x d_inner = 16 x 5120.
    mamba = {"ssm.conv_kernel": 4, "ssm.inner_size": 5120, "ssm.state_size": 16, "ssm.time_step_rank": 160}
    assert state_widths(mamba, 2560) == StateWidths(r=15360, s=81920)
    # Qwen3-Next 80B's gated delta net: 3 x (4096 + 2 x 16 x 128) = 24576; 128 x 4096 = 524288.
    qwen3next = {"ssm.conv_kernel": 4, "ssm.inner_size": 4096, "ssm.state_size": 128, "ssm.group_count": 16}
    assert state_widths(qwen3next, 2048) == StateWidths(r=24576, s=524288)
    # RWKV-6: R = token_shift_count (2) x n_embd; S = n_embd x head size.
    assert state_widths({"wkv.head_size": 64}, 2048) == StateWidths(r=4096, s=131072)
    # LFM2: R = n_embd x (l_cache - 1); no SSM state.
    assert state_widths({"shortconv.l_cache": 3}, 1024) == StateWidths(r=2048, s=0)


# ---- KV cells as llama_context and llama_kv_cache_iswa size them -------------------------------------


def test_context_cells() -> None:
    assert context_cells(8192, 4, unified=True) == (8192, 1)  # -np auto: 4 slots share one stream
    assert context_cells(1000, 1, unified=False) == (1024, 1)  # n_ctx padded to 256
    assert context_cells(32768, 4, unified=False) == (8192, 4)  # -np 4: a stream of ctx/4 each
    assert context_cells(1000, 3, unified=False) == (512, 3)  # 1024 // 3 = 341, padded to 512 (seen: 1536 cells)


def test_window_cells() -> None:
    assert window_cells(8192, 512, 4, unified=True, ubatch=512) == 2560  # 512 x 4 + 512 (REFERENCE.md)
    assert window_cells(8192, 1024, 4, unified=True, ubatch=300) == 4608  # 4396 padded to 256
    assert window_cells(2048, 512, 4, unified=False, ubatch=512) == 1024  # per stream: one window + ubatch
    assert window_cells(1024, 4096, 4, unified=True, ubatch=512) == 1024  # never more than the context


# ---- plans of generated headers ----------------------------------------------------------------------

# Gemma-3-27B's attention: 62 layers, 16 KV heads of 128, window 1024.
GEMMA3_27B = (5376, 32, 16, 128, 21504)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gemma3(tmp_path_factory.mktemp("g") / "g.gguf", 62, 1024, 262144, GEMMA3_27B)


def test_gemma3_keeps_every_sixth_layer_global(gemma: Path) -> None:
    shape = ModelShape.of(read_gguf(gemma))
    assert (shape.sliding_window, shape.n_layer - len(shape.swa_layers)) == (1024, 10)  # 5, 11, ..., 59
    # One cell of a layer: 16 heads x 128 x (K + V) x 2 bytes = 8192 bytes.
    # 10 global layers x 32768 cells = 2560 MiB; 52 windowed x (1024 x 4 + 512 = 4608 cells) = 1872 MiB.
    p = plan(shape, [gpu(0, 80)], ctx=32768)
    assert p.fits and p.devices[0].kv_cache_mib == 2560 + 1872
    assert (p.swa_layers, p.sliding_window, p.parallel, p.kv_unified) == (52, 1024, 4, True)
    # -np 2 without --kv-unified: two streams of 16384 cells; windows of 1024 + 512 = 1536 cells each.
    two = plan(shape, [gpu(0, 80)], ctx=32768, args=["-np", "2"])
    assert two.devices[0].kv_cache_mib == (10 * 32768 + 52 * 2 * 1536) * 8192 // MIB
    assert plan(shape, [gpu(0, 80)], ctx=32768, args=["--swa-full"]).devices[0].kv_cache_mib == 62 * 256


def test_gemma3_without_flash_attention_on_a_gpu_it_has_no_kernel_for(tmp_path: Path) -> None:
    odd = write_gemma3(tmp_path / "odd.gguf", 6, 512, 2048, (256, 4, 2, 72, 512))  # head size 72: no CUDA kernel
    shape = ModelShape.of(read_gguf(odd))
    assert not plan(shape, [gpu(0, 24)]).flash_attn  # -fa auto on a GPU
    assert plan(shape, []).flash_attn  # the CPU backend runs any head size


def test_recurrent_state_is_planned_per_slot(tmp_path: Path) -> None:
    shape = ModelShape.of(read_gguf(write_mamba(tmp_path / "m.gguf", 6)))
    # R = 3 x 512, S = 16 x 512 f32 per sequence: 39936 bytes per layer and slot; 6 layers x 4 slots.
    assert shape.state == StateWidths(r=1536, s=8192)
    p = plan(shape, [gpu(0, 24)], ctx=4096)
    assert (p.devices[0].kv_cache_mib, p.recurrent_layers) == (0, 6)
    assert p.devices[0].recurrent_mib == -(-(6 * 4 * (1536 + 8192) * 4) // MIB)  # 0.89 MiB, rounded up


@pytest.mark.parametrize("args", [["--n-cpu-moe", "2"], ["-ot", r"blk\.[01]\.ffn_.*_exps=CPU"]])
def test_experts_kept_on_the_host(tmp_path: Path, args: list[str]) -> None:
    shape = ModelShape.of(read_gguf(write_qwen3moe(tmp_path / "q.gguf", 6)))
    experts = sum(size for layer, name, size in shape.layer_tensors if layer < 2 and "_exps" in name)
    assert experts == 2 * 3 * 8 * 256 * 256 * 2  # 2 layers x gate/up/down x 8 experts x 256 x 256, f16
    runtime = runtime_for(ModelSettings(model=Path("/m.gguf"), args=args), shape)
    assert runtime.host_weights[:3] == (experts // 2, experts // 2, 0)
    everything = plan(shape, [gpu(0, 24)], ctx=4096)
    kept = plan(shape, [gpu(0, 24)], ctx=4096, args=args)
    assert everything.devices[0].weights_mib - kept.devices[0].weights_mib == experts // MIB
    assert kept.host.weights_mib - everything.host.weights_mib == experts // MIB


def test_an_mla_cache_keeps_k_only(tmp_path: Path) -> None:
    shape = ModelShape.of(read_gguf(write_qwen3moe(tmp_path / "q.gguf", 2)))
    mla = ModelShape(**{**vars(shape), "n_head_kv": (1, 1), "key_lengths": (576, 576), "value_lengths": (0, 0)})
    # DeepSeek-V3 as converted for MLA: one 576-wide K row (kv_lora_rank 512 + rope 64) per cell, no V.
    assert kv_bytes(mla, Runtime(ctx=4096), 0) == 4096 * 576 * 2


def test_unknown_architectures_plan_with_a_warning(tmp_path: Path) -> None:
    shape = ModelShape.of(read_gguf(write_unknown_architecture(tmp_path / "f.gguf")))
    assert rule_of("futur3") is None and not shape.swa_layers  # the generic rule: every layer full
    p = plan(shape, [gpu(0, 24)], ctx=4096)
    assert p.fits and p.warnings and "'futur3' has no rule in the planner" in p.warnings[0]
    assert f"warning: {p.warnings[0]}" in format_plan("m", p)


def test_flags_the_plan_cannot_follow_are_named() -> None:
    args = ["-nkvo", "--split-mode", "row", "-ot", "exps=CUDA1", "--jinja", "-np", "2", "--lora", "a.gguf"]
    found = not_modelled(args)
    assert [f.split(":")[0] for f in found] == ["-nkvo", "--lora", "--split-mode row", "-ot exps=CUDA1"]
    assert not_modelled(["-np", "2", "--jinja", "-fa", "on", "--n-cpu-moe", "3", "-ot", "exps=CPU"]) == []


def test_the_plan_shows_what_it_assumed(gemma: Path) -> None:
    shape = ModelShape.of(read_gguf(gemma))
    text = format_plan("g", plan(shape, [gpu(0, 80)], ctx=32768, args=["-np", "2", "-nkvo", "-ub", "1024"]))
    assert "architecture gemma3: 52 sliding-window layers (window 1024), 2 slots with a KV stream each" in text
    assert "ubatch 1024" in text
    assert "not modelled: -nkvo: the KV cache stays in host memory" in text


def test_the_projector_is_counted_on_the_first_gpu(tmp_path: Path) -> None:
    projector = write_tiny_llama(tmp_path / "mmproj.gguf", TinyShape(n_embd=1024, n_ff=4096))  # any GGUF will do
    weights_b = sum(t.n_bytes for t in read_gguf(projector).tensors)
    path = write_qwen3moe(tmp_path / "q.gguf")
    model = ModelSettings(model=path, ctx=4096, args=["--mmproj", str(projector)])
    assert projector_bytes(model) == weights_b
    shape = ModelShape.of(read_gguf(path))
    on_gpu = make_plan("m", model, shape, [gpu(0, 24)], {}, {}, GpuSettings(), weights_b)
    assert (on_gpu.devices[0].projector_mib, on_gpu.host.projector_mib) == (-(-weights_b // MIB), 0)
    kept = model.model_copy(update={"args": [*model.args, "--no-mmproj-offload"]})
    on_host = make_plan("m", kept, shape, [gpu(0, 24)], {}, {}, GpuSettings(), weights_b)
    assert (on_host.devices[0].projector_mib, on_host.host.projector_mib) == (0, -(-weights_b // MIB))
