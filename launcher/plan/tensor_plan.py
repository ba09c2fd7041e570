"""A plan's split mode applied to its layer layout: `split_mode: auto` decided from the links of the GPUs the
layer plan needs, and a `-sm tensor` layout sized per device from split_modes.py's rules."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from launcher.gpu.types import Link
from launcher.plan.estimate import MIB, ModelShape, Runtime, kv_bytes, state_bytes
from launcher.plan.layout import DeviceLoad, Layout, UsableGpu, layout
from launcher.plan.split_modes import Heads, SplitChoice, SplitMode, choose, tensor_split

# Recurrent layers (RWKV, LFM2's short convolutions, the linear attention of hybrids) are split by
# get_split_granularity's linear-attention rules (src/llama-model.cpp: ssm_d_state heads, the r/s caches in
# lcm(block, 128, head) steps, LFM2's conv state mirrored), which the planner does not size: refused.
UNSIZED_RECURRENT = "the planner does not size a tensor split of recurrent layers (get_split_granularity)"


def heads_of(shape: ModelShape) -> list[Heads]:
    """Each layer's attention shape as llama_hparams gives it."""
    keys = shape.key_lengths or (shape.key_length,) * shape.n_layer
    values = shape.value_lengths or (shape.value_length,) * shape.n_layer
    return [Heads(shape.n_head, shape.n_head_kv[il], keys[il], values[il] or keys[il]) for il in range(shape.n_layer)]


def tensor_layout(shape: ModelShape, runtime: Runtime, gpus: Sequence[UsableGpu], overhead_b: int) -> Layout:
    """Every layer on every GPU of ``gpus``, each holding its slice of every split tensor, the mirrored ones
    whole, its heads' part of the KV cache, and a compute buffer as large as one device's that held the
    whole model: the Meta device runs the full graph on each device, its activations mirrored or partial
    sums at full size (measured: 17.01 MiB per device against 17.0 for one). The projector (--mmproj)
    is whole on the first device: mtmd never sees the Meta device (tools/mtmd/clip.cpp, clip_ctx, takes
    --device's first entry or the first GPU registered). The shares (`-ts`) follow each
    GPU's room once the parts that no share changes are set aside (see ``shares``); equal shares where
    those do not fit and equal ones do."""
    even = _laid(shape, runtime, gpus, overhead_b, (1.0,) * len(gpus))
    weighted = shares(even, gpus)
    if weighted == even.split:
        return even.layout
    found = _laid(shape, runtime, gpus, overhead_b, weighted).layout
    return found if found.fits or not even.layout.fits else even.layout


@dataclass(frozen=True)
class _Laid:
    layout: Layout
    split: tuple[float, ...]
    fixed_b: tuple[int, ...]  # per device: what no share changes (mirrored weights, compute, overhead, ...)
    shared_b: int  # the weights and KV cache the shares divide, over all devices


def _laid(
    shape: ModelShape, runtime: Runtime, gpus: Sequence[UsableGpu], overhead_b: int, split: tuple[float, ...]
) -> _Laid:
    kinds = [(il in shape.recurrent_layers, il in shape.swa_layers) for il in range(shape.n_layer)]
    parts = tensor_split(shape.tensors, heads_of(shape), kinds, split)
    whole = layout(shape, runtime, gpus[:1], [shape.n_layer + 1], overhead_b)
    devices = []
    for d, gpu in enumerate(gpus):
        kv = sum(int(kv_bytes(shape, runtime, il) * parts.kv_fraction[il][d]) for il in range(shape.n_layer))
        state = sum(state_bytes(shape, runtime, il) for il in range(shape.n_layer)) // len(gpus)
        devices.append(
            DeviceLoad(
                gpu=gpu.index,
                uuid=gpu.uuid,
                name=gpu.name,
                layers=shape.n_layer,
                output=True,
                weights_b=parts.weights_b[d],
                kv_b=kv,
                compute_b=whole.devices[0].compute_b,
                overhead_b=gpu.overhead(overhead_b),
                usable_mib=gpu.usable_mib,
                state_b=state,
                projector_b=runtime.projector_bytes if d == 0 else 0,
                host=gpu.host,
                endpoint=gpu.endpoint,
            )
        )
    fixed = tuple(d.total_b - (d.weights_b - parts.mirrored_b) - d.kv_b for d in devices)
    shared = sum(d.total_b for d in devices) - sum(fixed)
    return _Laid(Layout(tuple(devices), whole.host, shape.n_layer + 1, split, tensor=True), split, fixed, shared)


def shares(even: _Laid, gpus: Sequence[UsableGpu]) -> tuple[float, ...]:
    """The `-ts` weights: each GPU's room once its fixed part is set aside, as a ratio to the smallest room,
    in hundredths (so equal GPUs read `1,1`). llama.cpp divides every split tensor and the KV cache by them
    (src/llama-model.cpp, llama_meta_device_get_split_state: row ne x cumulative share / total, rounded down
    to the granularity), so a GPU with twice the room takes twice the slice. Equal where some GPU has no
    room left at all (nothing fits then)."""
    rooms = [gpu.usable_mib * MIB - fixed for gpu, fixed in zip(gpus, even.fixed_b, strict=True)]
    if min(rooms) <= 0:
        return even.split
    return tuple(math.floor(room / min(rooms) * 100) / 100 for room in rooms)


def gpus_of(chosen: Layout, gpus: Sequence[UsableGpu]) -> list[UsableGpu]:
    """The GPUs of ``gpus`` that ``chosen``'s devices are, in its order (peers' by endpoint)."""
    by_key = {(g.endpoint, g.index): g for g in gpus}
    return [by_key[(d.endpoint, d.gpu)] for d in chosen.devices]


def relaid(
    shape: ModelShape, runtime: Runtime, chosen: Layout, gpus: Sequence[UsableGpu], overhead_b: int
) -> Layout | None:
    """A tensor layout ``chosen`` again at another runtime (`ctx: max`'s next step), on the same GPUs, fitting
    or not; None for a layer split, which is planned afresh at each context (its counts move)."""
    if not chosen.tensor:
        return None
    return tensor_layout(shape, dataclasses.replace(runtime, flash_attn=True), gpus_of(chosen, gpus), overhead_b)


def apply_split_mode(
    requested: str,
    backend: str,
    shape: ModelShape,
    runtime: Runtime,
    chosen: Layout,
    links: Mapping[tuple[int, int], Link],
    gpus: Sequence[UsableGpu],
    overhead_b: int,
) -> tuple[Layout, Runtime, SplitChoice]:
    """The layout, runtime and mode the server runs with, given the layer layout ``chosen`` (which decides
    how many GPUs the model needs) of ``gpus`` (those it may use)."""
    local = [d.gpu for d in chosen.devices if not d.endpoint]
    remote = any(d.endpoint for d in chosen.devices)
    choice = choose(requested, shape.architecture, backend, local, links, remote)
    if choice.mode is SplitMode.TENSOR and shape.recurrent_layers:
        why = f"layer: tensor cannot run here ({UNSIZED_RECURRENT})"
        choice = SplitChoice(
            SplitMode.LAYER, why, f"split_mode: {UNSIZED_RECURRENT}" if requested == "tensor" else None
        )
    if choice.mode is not SplitMode.TENSOR:
        return chosen, runtime, choice
    on = dataclasses.replace(runtime, flash_attn=True)  # llama_init_from_model turns it on for tensor
    found = tensor_layout(shape, on, gpus_of(chosen, gpus), overhead_b)
    if not found.fits:
        short = ", ".join(str(d.gpu) for d in found.devices if not d.fits)
        why = f"layer: a tensor split does not fit on GPU {short} (the compute buffer is whole on each)"
        return chosen, runtime, SplitChoice(SplitMode.LAYER, why, why if requested == "tensor" else None)
    return found, on, choice


def tensor_instead(
    requested: str,
    backend: str,
    shape: ModelShape,
    runtime: Runtime,
    allowed: Sequence[UsableGpu],
    links: Mapping[tuple[int, int], Link],
    overhead_b: int,
) -> tuple[Layout, Runtime, SplitChoice] | None:
    """A tensor split where the layer split finds no room: on the fewest of the roomiest GPUs (shares weighted
    by their room), directly linked ones only for `auto`. None where none fits or the mode
    cannot run. A pipeline keeps copies of its inputs per device and a compute buffer per stage; a tensor
    split divides the KV cache and matrices instead, so it can fit where layers do not."""
    if shape.recurrent_layers:
        return None
    roomiest = sorted(allowed, key=lambda g: -g.usable_mib)
    on = dataclasses.replace(runtime, flash_attn=True)
    for size in range(2, len(roomiest) + 1):
        group = sorted(roomiest[:size], key=lambda g: g.index)
        indices = [g.index for g in group]
        choice = choose(requested, shape.architecture, backend, indices, links, remote=False)
        if requested == "auto" and choice.mode is not SplitMode.TENSOR:
            continue
        if choice.mode is not SplitMode.TENSOR:
            return None
        found = tensor_layout(shape, on, group, overhead_b)
        if found.fits:
            return found, on, choice
    return None
