"""What a model needs, term by term: weights per layer, the output layer, the KV cache per layer, compute
buffers, from the GGUF header and the launch settings. Pure arithmetic, in bytes.

The compute-buffer formula was fitted to the buffer sizes llama-server reports with `-lv 4` (llama.cpp
b11434 on its RPC and CPU backends): the peak of one layer's graph, which is the FFN's three
`ubatch x n_ff` f32 intermediates or, without flash attention, the `n_kv x ubatch x n_head` f32 scores;
plus the attention mask (`n_kv x ubatch`, f16 with flash attention, f32 without), a few f32 activation
rows, and, split over several devices, the pipeline's copies of mask and inputs.
`bench/accuracy.py` checks all of it against llama-server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from launcher.plan.args import CACHE_TYPE_BYTES
from launcher.plan.gguf import GgufFile, ModelFileError

MIB = 1024 * 1024
# Head sizes for which llama.cpp's CUDA/ROCm flash-attention kernels exist: `-fa auto` turns it on.
_FLASH_HEAD_SIZES = {64, 80, 96, 112, 128, 192, 256, 576}
_CTX_PAD = 256
_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class ModelShape:
    """The facts of a model that memory depends on."""

    architecture: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: tuple[int, ...]  # per layer
    key_length: int
    value_length: int
    n_vocab: int
    context_length: int
    sliding_window: int  # 0: none
    swa_layers: frozenset[int]
    layer_bytes: tuple[int, ...]  # weights of each repeating layer
    output_bytes: int  # output.weight (or the tied token_embd copy) + output_norm: on the last device
    embedding_bytes: int  # token_embd: always in host memory

    @classmethod
    def of(cls, model: GgufFile) -> ModelShape:
        n_layer = int(model.arch("block_count", 0))
        n_head = int(model.arch("attention.head_count", 0) or 0)
        n_embd = int(model.arch("embedding_length", 0))
        if not n_layer or not n_head or not n_embd:
            raise ModelFileError(f"{model.path}: not a transformer model (no block_count, head_count or n_embd)")
        kv = model.arch("attention.head_count_kv", n_head)
        n_head_kv = tuple(int(k) for k in kv) if isinstance(kv, list) else (int(kv),) * n_layer
        n_ff = model.arch("feed_forward_length", 4 * n_embd)
        layers = [0] * n_layer
        named = {t.name: t.n_bytes for t in model.tensors}
        for tensor in model.tensors:
            found = _LAYER.match(tensor.name)
            if found and int(found.group(1)) < n_layer:
                layers[int(found.group(1))] += tensor.n_bytes
        embedding = named.get("token_embd.weight", 0)
        output = named.get("output.weight", embedding) + named.get("output_norm.weight", 0)
        window = int(model.arch("attention.sliding_window", 0) or 0)
        return cls(
            architecture=model.architecture,
            n_layer=n_layer,
            n_embd=n_embd,
            n_ff=max(n_ff) if isinstance(n_ff, list) else int(n_ff),
            n_head=n_head,
            n_head_kv=n_head_kv,
            key_length=int(model.arch("attention.key_length", n_embd // n_head)),
            value_length=int(model.arch("attention.value_length", n_embd // n_head)),
            n_vocab=model.vocab_size,
            context_length=int(model.arch("context_length", 4096)),
            sliding_window=window,
            swa_layers=_swa_layers(model, n_layer) if window else frozenset(),
            layer_bytes=tuple(layers),
            output_bytes=output,
            embedding_bytes=embedding,
        )


def size_only(size_bytes: int, layers: int = 100) -> ModelShape:
    """A model known only by its size (an Ollama model whose blob is not at hand): equal blocks of weights
    (so it can still be split over GPUs), no KV cache or compute of its own; overhead and margin apply."""
    block = size_bytes // layers
    return ModelShape(
        architecture="unknown",
        n_layer=layers,
        n_embd=1,
        n_ff=0,
        n_head=1,
        n_head_kv=(0,) * layers,
        key_length=0,
        value_length=0,
        n_vocab=0,
        context_length=4096,
        sliding_window=0,
        swa_layers=frozenset(),
        layer_bytes=(block,) * (layers - 1) + (size_bytes - block * (layers - 1),),
        output_bytes=0,
        embedding_bytes=0,
    )


def _swa_layers(model: GgufFile, n_layer: int) -> frozenset[int]:
    """Layers that use the sliding window: an explicit pattern array, or every layer but each Nth."""
    pattern = model.arch("attention.sliding_window_pattern")
    if isinstance(pattern, list):
        return frozenset(i for i, swa in enumerate(pattern[:n_layer]) if swa)
    period = int(pattern) if pattern else 0
    if period > 1:  # every period-th layer is global, the rest slide
        return frozenset(i for i in range(n_layer) if (i + 1) % period)
    return frozenset(range(n_layer))


@dataclass(frozen=True)
class Runtime:
    """How the server will be run: what, besides the model, decides the memory."""

    ctx: int
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: bool = True
    ubatch: int = 512
    parallel: int = 4  # slots; with a unified KV cache they share ctx


def padded_ctx(ctx: int) -> int:
    return (ctx + _CTX_PAD - 1) // _CTX_PAD * _CTX_PAD


def flash_attention_default(shape: ModelShape) -> bool:
    """What `-fa auto` picks on a GPU backend: on where a kernel for the head size exists."""
    return shape.key_length == shape.value_length and shape.key_length in _FLASH_HEAD_SIZES


def kv_cells(shape: ModelShape, runtime: Runtime, layer: int) -> int:
    """Cells of the KV cache of ``layer``: the context, or the window for sliding-window layers."""
    cells = padded_ctx(runtime.ctx)
    if layer in shape.swa_layers:
        cells = min(cells, padded_ctx(shape.sliding_window * runtime.parallel + runtime.ubatch))
    return cells


def kv_bytes(shape: ModelShape, runtime: Runtime, layer: int) -> int:
    k = CACHE_TYPE_BYTES[runtime.cache_type_k] * shape.key_length
    v = CACHE_TYPE_BYTES[runtime.cache_type_v] * shape.value_length
    return int(kv_cells(shape, runtime, layer) * shape.n_head_kv[layer] * (k + v))


def pipeline_copies(devices: int, full_offload: bool) -> int:
    """llama.cpp runs a model split over several devices as a pipeline (full offload only), keeping
    GGML_SCHED_MAX_COPIES (4) copies of each split's inputs so that micro-batches overlap."""
    return 4 if devices > 1 and full_offload else 1


def _mask(runtime: Runtime) -> int:
    return padded_ctx(runtime.ctx) * runtime.ubatch * (2 if runtime.flash_attn else 4)


def compute_bytes(
    shape: ModelShape, runtime: Runtime, *, with_layers: bool, copies: int = 1, first: bool = False
) -> int:
    """The compute buffer of a device that holds at least one repeating layer (else: almost nothing).
    The first device of a pipeline also keeps the copies of the pipeline's input rows."""
    if not with_layers:
        return 0
    ffn = 3 * runtime.ubatch * shape.n_ff * 4
    scores = 0 if runtime.flash_attn else padded_ctx(runtime.ctx) * runtime.ubatch * shape.n_head * 4
    rows = runtime.ubatch * shape.n_embd * 4  # one f32 activation row per ubatch token
    pipeline = (copies - 1) * (_mask(runtime) + rows) + (2 * copies * rows if first and copies > 1 else 0)
    return max(ffn, scores) + _mask(runtime) + 4 * rows + pipeline


def host_compute_bytes(shape: ModelShape, runtime: Runtime, copies: int = 1) -> int:
    """The CPU compute buffer llama.cpp keeps beside GPU ones (inputs, the embedding lookup)."""
    rows = runtime.ubatch * shape.n_embd * 4
    return copies * _mask(runtime) + (4 if copies == 1 else 10) * rows
