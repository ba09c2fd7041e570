"""What a model needs, term by term: weights per layer, the output layer, the KV cache per layer, compute
buffers, from the GGUF header and the launch settings. Pure arithmetic, in bytes.

Compute buffers are `compute.py`'s, from each layer's `LayerWork` (arch.py) kept here.
`bench/accuracy.py` and `bench/accuracy_arch.py` check all of it against llama-server.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from launcher.plan.arch import (
    LayerWork,
    Recurrence,
    Rule,
    StateWidths,
    kv_layers,
    layer_work,
    recurrent_layers,
    rule_of,
    sliding_window,
    state_widths,
)
from launcher.plan.gguf import GgufFile, ModelFileError, TensorInfo
from launcher.server_args import CACHE_TYPE_BYTES

MIB = 1024 * 1024
# Head sizes for which llama.cpp's CUDA/ROCm flash-attention kernels exist: `-fa auto` turns it on.
_FLASH_HEAD_SIZES = {64, 80, 96, 112, 128, 192, 256, 576}
_CTX_PAD = 256
_LAYER = re.compile(r"^blk\.(\d{1,9})\.")  # a longer number is no layer (and too long for int())


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
    known_architecture: bool = True  # False: planned with the generic rule (arch.py has none for it)
    kv_layers: frozenset[int] | None = None  # layers with an attention KV cache (None: all)
    key_lengths: tuple[int, ...] = ()  # per layer where they differ from key_length (sliding-window layers)
    value_lengths: tuple[int, ...] = ()  # per layer; 0 for an MLA cache, which keeps K only
    recurrent_layers: frozenset[int] = frozenset()
    state: StateWidths = field(
        default_factory=lambda: StateWidths(0, 0)
    )  # f32 elements of a recurrent layer's R and S rows, per sequence
    work: tuple[LayerWork, ...] = ()  # per layer, what it asks of the compute buffer (none: a plain FFN's)
    # (layer, name, bytes) of every repeating layer's tensors: what -ot and --cpu-moe keep on the host.
    layer_tensors: tuple[tuple[int, str, int], ...] = field(default=(), compare=False, repr=False)
    tensors: tuple[TensorInfo, ...] = field(default=(), compare=False, repr=False)  # all, for -sm tensor

    @functools.cached_property
    def widest_value_row(self) -> int:
        """The widest layer's V row (n_head_kv x its value head size), worked out once per shape: a V
        cache stored transposed (no flash attention) pads every layer's rows to it."""
        values = self.value_lengths or (self.value_length,) * self.n_layer
        return max(heads * value for heads, value in zip(self.n_head_kv, values, strict=False))

    @classmethod
    def of(cls, model: GgufFile) -> ModelShape:
        n_layer = int(model.arch("block_count", 0))
        n_head = _first(model.arch("attention.head_count", 0))
        n_embd = int(model.arch("embedding_length", 0))
        rule = rule_of(model.architecture)
        if not n_layer or not n_embd or (not n_head and (rule is None or rule.recurrence is Recurrence.NONE)):
            raise ModelFileError(f"{model.path}: not a transformer model (no block_count, head_count or n_embd)")
        known = rule is not None
        rule = rule or Rule()
        n_head_kv = _per_layer(model.arch("attention.head_count_kv", model.arch("attention.head_count", 0)), n_layer)
        n_ff = _per_layer(model.arch("feed_forward_length", 4 * n_embd), n_layer)
        layers = [0] * n_layer
        tensors = []
        named = {t.name: t.n_bytes for t in model.tensors}
        for tensor in model.tensors:
            found = _LAYER.match(tensor.name)
            if found and int(found.group(1)) < n_layer:
                layers[int(found.group(1))] += tensor.n_bytes
                tensors.append((int(found.group(1)), tensor.name, tensor.n_bytes))
        embedding = named.get("token_embd.weight", 0)
        output = named.get("output.weight", embedding) + named.get("output_norm.weight", 0)
        head_dim = n_embd // n_head if n_head else 0
        key_length = int(model.arch("attention.key_length", head_dim))
        value_length = int(model.arch("attention.value_length", head_dim))
        window_key = model.arch("attention.sliding_window")
        window, swa = sliding_window(
            rule,
            n_layer,
            None if window_key is None else int(window_key),
            model.arch("attention.sliding_window_pattern"),
        )
        recurrent = recurrent_layers(rule, n_layer, n_head_kv, n_ff, model.arch("full_attention_interval"))
        keys = _arch_keys(model)
        names: list[set[str]] = [set() for _ in range(n_layer)]
        for layer, name, _ in tensors:
            names[layer].add(name)
        kv = kv_layers(rule, n_layer, recurrent, int(model.arch("nextn_predict_layers", 0) or 0))
        # a layer attends unless it is recurrent only (layers that reuse another's KV still attend)
        attending = frozenset(il for il in range(n_layer) if il not in recurrent or il in kv)
        mla = bool(model.arch("attention.key_length_mla")) and bool(model.arch("attention.value_length_mla"))
        k_mla = int(model.arch("attention.key_length_mla", 0)) if mla else 0  # is_mla(): both keys
        width = attention_width(n_head, key_length, value_length, k_mla)
        key_swa = int(model.arch("attention.key_length_swa", key_length))
        value_swa = int(model.arch("attention.value_length_swa", value_length))
        return cls(
            architecture=model.architecture,
            n_layer=n_layer,
            n_embd=n_embd,
            n_ff=max(n_ff),
            n_head=n_head,
            n_head_kv=n_head_kv,
            key_length=key_length,
            value_length=value_length,
            n_vocab=model.vocab_size,
            context_length=int(model.arch("context_length", 4096)),
            sliding_window=window,
            swa_layers=swa,
            layer_bytes=tuple(layers),
            output_bytes=output,
            embedding_bytes=embedding,
            known_architecture=known,
            kv_layers=kv,
            key_lengths=tuple(key_swa if il in swa else key_length for il in range(n_layer)),
            value_lengths=tuple(0 if mla else value_swa if il in swa else value_length for il in range(n_layer)),
            recurrent_layers=recurrent,
            state=state_widths(keys, n_embd) if recurrent else StateWidths(0, 0),
            work=layer_work(keys, n_embd, n_ff, width, names, attending, swa, recurrent, not rule.outputs_after_last),
            layer_tensors=tuple(tensors),
            tensors=tuple(model.tensors),
        )


def attention_width(n_head: int, key_length: int, value_length: int, key_length_mla: int = 0) -> int:
    """f32 elements per token an attention layer holds at once: Q and its output (n_head x the widest head;
    flash attention writes no scores). MLA (src/models/deepseek2.cpp with `key_length_mla`): q (n_head x
    key_length_mla), its absorbed no-rope part and roped rope part (n_head x kv_lora_rank, n_head x n_rot:
    n_head x key_length together) and their concat Qcur (n_head x key_length), the four alive at once."""
    if key_length_mla:
        return n_head * (key_length_mla + 2 * key_length)
    return n_head * max(key_length, value_length)


def _first(value: object) -> int:
    """A key that may be per layer (head_count for OpenELM), as the one number llama.cpp's n_head() takes."""
    return int(value[0]) if isinstance(value, list) else int(value or 0)  # type: ignore[call-overload]


def _per_layer(value: object, n_layer: int) -> tuple[int, ...]:
    if isinstance(value, list):
        return tuple(int(v) for v in value[:n_layer])
    return (int(value or 0),) * n_layer  # type: ignore[call-overload]


def _arch_keys(model: GgufFile) -> dict[str, object]:
    prefix = f"{model.architecture}."
    return {k[len(prefix) :]: v for k, v in model.metadata.items() if k.startswith(prefix)}


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


@dataclass(frozen=True)
class Runtime:
    """How the server will be run: what, besides the model, decides the memory."""

    ctx: int
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: bool = True
    ubatch: int = 512  # the physical batch: min(-ub, -b)
    parallel: int = 4  # slots (-np); llama-server's auto is 4 sharing one unified cache
    kv_unified: bool = True  # one stream of ctx cells for all slots; else one stream of ctx/parallel each
    swa_full: bool = False  # --swa-full: sliding-window layers get the whole context
    host_weights: tuple[int, ...] = ()  # per layer, bytes -ot/--cpu-moe keep in host memory
    projector_bytes: int = 0  # --mmproj's weights, on the first GPU


def padded_ctx(ctx: int) -> int:
    return (ctx + _CTX_PAD - 1) // _CTX_PAD * _CTX_PAD


def context_cells(ctx: int, parallel: int, unified: bool) -> tuple[int, int]:
    """(cells per stream, streams) of a full-context cache. llama_context pads n_ctx to 256; without a
    unified cache each slot gets its own stream of n_ctx / n_seq cells, padded to 256 again (so
    `-c 1000 -np 3` gives 3 x 512 cells, not 1000)."""
    n_ctx = padded_ctx(ctx)
    if unified or parallel <= 1:
        return n_ctx, 1
    return padded_ctx(n_ctx // parallel), parallel


def window_cells(per_stream: int, window: int, parallel: int, unified: bool, ubatch: int) -> int:
    """Cells per stream of the sliding-window cache (llama_kv_cache_iswa): the window of every sequence
    in the stream plus one ubatch, padded to 256, never more than the full cache."""
    return padded_ctx(min(per_stream, window * (parallel if unified else 1) + ubatch))


def flash_attention_default(shape: ModelShape, on_gpu: bool = True) -> bool:
    """What `-fa auto` picks: the CPU backend runs flash attention for every head size; CUDA and ROCm only
    where a kernel exists (equal K and V head sizes, or MLA's 576/512)."""
    if not on_gpu:
        return True
    sizes = {shape.key_length, *shape.key_lengths}
    values = {shape.value_length, *(v for v in shape.value_lengths if v)}
    if sizes == {576} and values == {512}:
        return True
    return sizes == values and sizes <= _FLASH_HEAD_SIZES


def kv_cells(shape: ModelShape, runtime: Runtime, layer: int) -> int:
    """Cells of the KV cache of ``layer``, over all its streams: the context, or the window for
    sliding-window layers (unless --swa-full)."""
    per_stream, streams = context_cells(runtime.ctx, runtime.parallel, runtime.kv_unified)
    if layer in shape.swa_layers and not runtime.swa_full:
        unified = streams == 1
        per_stream = window_cells(per_stream, shape.sliding_window, runtime.parallel, unified, runtime.ubatch)
    return per_stream * streams


def kv_bytes(shape: ModelShape, runtime: Runtime, layer: int) -> int:
    """K and V rows of ``layer`` (n_head_kv x head size each), none where the layer keeps no KV. Without
    flash attention V is stored transposed and padded to the widest layer's V."""
    if shape.kv_layers is not None and layer not in shape.kv_layers:
        return 0
    key = shape.key_lengths[layer] if shape.key_lengths else shape.key_length
    value = shape.value_lengths[layer] if shape.value_lengths else shape.value_length
    v_width = shape.widest_value_row if not runtime.flash_attn and value else shape.n_head_kv[layer] * value
    k = CACHE_TYPE_BYTES[runtime.cache_type_k] * shape.n_head_kv[layer] * key
    v = CACHE_TYPE_BYTES[runtime.cache_type_v] * v_width
    return int(kv_cells(shape, runtime, layer) * (k + v))


def state_bytes(shape: ModelShape, runtime: Runtime, layer: int) -> int:
    """The recurrent state of ``layer`` (llama_memory_recurrent): one f32 R and S row per sequence."""
    if layer not in shape.recurrent_layers:
        return 0
    return (shape.state.r + shape.state.s) * 4 * max(1, runtime.parallel)
