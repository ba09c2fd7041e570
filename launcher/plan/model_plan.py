"""The plan for one model: which GPUs, how many MiB of what on each, the split, or why it does not fit
and what would. A pure function of (model file, model settings, GPU samples, other instances' claims)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from launcher.config_gpus import GpuSettings
from launcher.config_model import ModelSettings
from launcher.gpu.types import Link
from launcher.plan.context import CELLS, largest, size_context, streams
from launcher.plan.estimate import MIB, ModelShape, Runtime, kv_bytes, padded_ctx
from launcher.plan.layout import (
    DeviceLoad,
    Layout,
    UsableGpu,
    candidate_sets,
    counts_from_split,
    fewest_gpus,
    holds,
    layout,
    most_layers,
)
from launcher.plan.remote import NO_REMOTE, Remote, across_hosts, network_cost
from launcher.plan.runtime import not_modelled, runtime_for
from launcher.plan.split_modes import SplitChoice, SplitMode
from launcher.plan.tensor_plan import apply_split_mode, relaid, tensor_instead
from launcher.schema_gpus import GpuSample
from launcher.schema_plans import DevicePlan, HostPlan, Plan

GIB = 1024 * MIB


def _mib(b: int | float) -> int:
    return -(-int(b) // MIB)  # rounded up: a plan never claims less than it needs


def _gib(b: float) -> str:
    """A size as people read it: GiB with one decimal, MiB below 1 GiB."""
    return f"{b / GIB:.1f} GiB" if b >= GIB else f"{round(b / MIB)} MiB"


def usable_gpus(
    samples: Sequence[GpuSample],
    claims_mib: Mapping[int, int],
    gpus: GpuSettings,
    learned_overhead_mib: Mapping[int, int] | None = None,
) -> list[UsableGpu]:
    """What each readable GPU can give this instance: min(free now, total - other instances' claims)
    less the margin and the GPU's reserve; with the driver's share measured on it, by index, if any."""
    learned = learned_overhead_mib or {}
    result = []
    for s in samples:
        if s.error is not None or s.memory_total_mib is None or s.memory_free_mib is None:
            continue
        available_mib = min(s.memory_free_mib, s.memory_total_mib - claims_mib.get(s.index, 0))
        usable = available_mib - gpus.margin_mib - gpus.reserve_mib.get(s.index, 0)
        overhead_b = learned[s.index] * MIB if s.index in learned else None
        result.append(
            UsableGpu(s.index, s.uuid, s.name, s.memory_total_mib, max(0, usable), learned_overhead_b=overhead_b)
        )
    return result


def _allowed(model: ModelSettings, available: list[UsableGpu]) -> list[UsableGpu]:
    if model.gpus == "auto":
        return available
    by_ref = {ref: r for r in available for ref in (r.index, r.uuid)}
    return [by_ref[ref] for ref in model.gpus if ref in by_ref]


def make_plan(
    name: str,
    model: ModelSettings,
    shape: ModelShape,
    samples: Sequence[GpuSample],
    links: dict[tuple[int, int], Link],
    claims_mib: Mapping[int, int],
    gpus: GpuSettings,
    projector_bytes: int = 0,
    remote: Remote = NO_REMOTE,
    learned_overhead_mib: Mapping[int, int] | None = None,
) -> Plan:
    """The plan; ``projector_bytes`` are the weights of the model's --mmproj file, if it has one;
    ``remote`` the peers' endpoints it may also use, when this host's GPUs do not hold it;
    ``learned_overhead_mib`` the driver's share measured on this host's GPUs, by index."""
    runtime = runtime_for(model, shape, on_gpu=bool(samples or remote.endpoints), projector_bytes=projector_bytes)
    allowed = _allowed(model, usable_gpus(samples, claims_mib, gpus, learned_overhead_mib))
    overhead_b = gpus.overhead_mib * MIB
    on_gpus = bool(samples or remote.endpoints)

    def place(r: Runtime) -> Layout | None:
        """Full offload as the model's settings ask, or None."""
        if not on_gpus:  # no GPU at all: everything in host memory
            return layout(shape, r, [], [], overhead_b)
        if isinstance(model.tensor_split, list):
            return _explicit_split(shape, r, allowed, model.tensor_split, links, overhead_b)
        found = fewest_gpus(shape, r, allowed, links, overhead_b)
        if found is None and remote.endpoints:  # remote devices are slower: only when local ones do not do
            found = across_hosts(shape, r, allowed, remote, overhead_b)
        return found

    layers_given = isinstance(model.tensor_split, list)
    offered = [*allowed, *(g for e in remote.endpoints for g in e.gpus)]

    def in_mode(r: Runtime, chosen: Layout | None) -> tuple[Layout | None, Runtime, SplitChoice]:
        """The layer layout ``chosen`` at ``r`` in the split mode the model runs with."""
        if chosen is not None and len(chosen.devices) > 1 and not layers_given:
            return apply_split_mode(model.split_mode, model.backend, shape, r, chosen, links, offered, overhead_b)
        if chosen is not None and layers_given and model.split_mode in ("row", "tensor"):
            why = f"split_mode: {model.split_mode} ignored: tensor_split gives layers per GPU"
            return chosen, r, SplitChoice(SplitMode.LAYER, f"layer: {why}", why)
        if chosen is not None and model.split_mode in ("row", "tensor"):
            return chosen, r, SplitChoice(SplitMode.LAYER, f"layer: {model.split_mode} needs the model on several GPUs")
        if chosen is None and on_gpus and not layers_given and model.split_mode in ("auto", "tensor"):
            instead = tensor_instead(model.split_mode, model.backend, shape, r, allowed, links, overhead_b)
            if instead is not None:
                return instead
        return chosen, r, SplitChoice(SplitMode.LAYER, "")

    sized = None
    if model.ctx == "max":  # sized in the mode it runs in: a tensor split holds more context than layers

        def relay(chosen: Layout, r: Runtime) -> Layout | None:
            return relaid(shape, r, chosen, offered, overhead_b)

        sized = size_context(
            shape,
            runtime,
            model.ctx_min,
            model.ctx_max,
            lambda r: in_mode(r, place(r))[0],
            offered if on_gpus else None,
            claims_mib,
            overhead_b,
            relay,
        )
        runtime = sized.runtime
    chosen = place(runtime) if sized is None else sized.layout
    refusal = sized.refusal if sized is not None else None
    split = SplitChoice(SplitMode.LAYER, "")
    if chosen is not None and chosen.tensor:  # `ctx: max` sized it so: the mode is chosen again, the same
        chosen, runtime, split = apply_split_mode(
            model.split_mode, model.backend, shape, runtime, chosen, links, offered, overhead_b
        )
    elif refusal is None:
        chosen, runtime, split = in_mode(runtime, chosen)
    if chosen is None and model.allow_cpu_offload and allowed and refusal is None:
        chosen = most_layers(shape, runtime, allowed, overhead_b)
    fits = chosen is not None
    if chosen is None:  # show what it would take on every allowed GPU
        chosen = _spread(shape, runtime, allowed, overhead_b)
    if not fits and refusal is None:
        refusal = _reason(chosen, allowed, name) + _remote_reason(remote)
        if sized is not None:
            refusal = f"{sized.choice.reason}: {refusal}"
    plan = Plan(
        model=str(model.model),
        backend=model.backend,
        fits=fits,
        reason=refusal,
        suggestions=[] if fits else _suggestions(model, shape, runtime, allowed, overhead_b),
        ctx=runtime.ctx,
        context=None if sized is None else sized.choice,
        flash_attn=runtime.flash_attn,
        cache_type_k=runtime.cache_type_k,
        cache_type_v=runtime.cache_type_v,
        gpu_layers=chosen.gpu_layers,
        devices=[_device(d) for d in chosen.devices],
        host=HostPlan(
            weights_mib=_mib(chosen.host.weights_b),
            kv_cache_mib=_mib(chosen.host.kv_b),
            compute_mib=_mib(chosen.host.compute_b),
            recurrent_mib=_mib(chosen.host.state_b),
            projector_mib=_mib(chosen.host.projector_b + projector_bytes - runtime.projector_bytes),
        ),
        tensor_split=list(chosen.split),
        architecture=shape.architecture,
        parallel=runtime.parallel,
        kv_unified=runtime.kv_unified,
        swa_full=runtime.swa_full,
        ubatch=runtime.ubatch,
        sliding_window=shape.sliding_window,
        swa_layers=len(shape.swa_layers),
        recurrent_layers=len(shape.recurrent_layers),
        warnings=architecture_warnings(shape)
        + [f"not planned onto: {why}" for why in remote.left_out]
        + ([split.warning] if split.warning else []),
        split_mode=split.mode.value,
        split_reason=split.reason,
        not_modelled=not_modelled(model.args),
        network=network_cost(shape, chosen) if fits else None,
    )
    if fits and chosen.gpu_layers and chosen.gpu_layers < shape.n_layer + 1:
        plan.suggestions.append(
            f"partial offload: {shape.n_layer - chosen.gpu_layers} of {shape.n_layer} layers run on the CPU"
        )
    return plan


def architecture_warnings(shape: ModelShape) -> list[str]:
    """What the plan says about an architecture it has no rule for."""
    if shape.known_architecture:
        return []
    return [
        f"architecture {shape.architecture!r} has no rule in the planner: planned as a plain transformer "
        "(full attention and a KV cache on every layer); compare with llama-server's -lv 4 buffer sizes"
    ]


def _device(load: DeviceLoad) -> DevicePlan:
    total = _mib(load.total_b)
    return DevicePlan(
        gpu=load.gpu,
        uuid=load.uuid,
        name=load.name,
        layers=load.layers,
        output_layer=load.output,
        weights_mib=_mib(load.weights_b),
        kv_cache_mib=_mib(load.kv_b),
        compute_mib=_mib(load.compute_b),
        overhead_mib=_mib(load.overhead_b),
        recurrent_mib=_mib(load.state_b),
        projector_mib=_mib(load.projector_b),
        total_mib=total,
        usable_mib=load.usable_mib,
        free_after_mib=load.usable_mib - total,
        host=load.host,
        endpoint=load.endpoint or None,
    )


def _explicit_split(
    shape: ModelShape,
    runtime: Runtime,
    allowed: list[UsableGpu],
    split: list[float],
    links: dict[tuple[int, int], Link],
    overhead_b: int,
) -> Layout | None:
    """The user's proportions, on the first GPUs of the `gpus:` list or the best set of that many."""
    if len(allowed) < len(split):
        return None
    group = allowed[: len(split)] if len(allowed) == len(split) else candidate_sets(allowed, len(split), links)[0]
    found = layout(shape, runtime, group, counts_from_split(split, shape.n_layer + 1), overhead_b)
    return found if found.fits else None


def _spread(shape: ModelShape, runtime: Runtime, allowed: list[UsableGpu], overhead_b: int) -> Layout:
    """Every layer over every allowed GPU in proportion to its room, fitting or not: the need to report."""
    if not allowed:
        return layout(shape, runtime, [], [], overhead_b)
    weights = [max(1, r.usable_mib) for r in allowed]
    return layout(shape, runtime, allowed, counts_from_split(weights, shape.n_layer + 1), overhead_b)


def _reason(need: Layout, allowed: list[UsableGpu], name: str) -> str:
    if not allowed:
        return f"{name} needs GPUs but none is usable (every GPU is full, in error, or not in `gpus:`)"
    total = sum(d.total_b for d in need.devices)
    weights = sum(d.weights_b + d.projector_b for d in need.devices)
    kv = sum(d.kv_b + d.state_b for d in need.devices)
    compute = sum(d.compute_b + d.overhead_b for d in need.devices)
    usable = sum(r.usable_mib for r in allowed) * MIB
    n = len(allowed)
    return (
        f"{name} needs {_gib(total)} on {n} GPU{'s' if n > 1 else ''} (weights {_gib(weights)}, KV cache "
        f"{_gib(kv)}, compute and overhead {_gib(compute)}) but only {_gib(usable)} is usable there"
    )


def _remote_reason(remote: Remote) -> str:
    if not remote.endpoints:
        return ""
    usable = sum(e.usable_mib for e in remote.endpoints)
    hosts = ", ".join(dict.fromkeys(e.host for e in remote.endpoints))
    return f"; nor with the RPC devices of {hosts} ({_gib(usable * MIB)} usable there)"


def _suggestions(
    model: ModelSettings,
    shape: ModelShape,
    runtime: Runtime,
    allowed: list[UsableGpu],
    overhead_b: int,
) -> list[str]:
    if not allowed:
        return ["free a GPU (stop what runs on it) or add one to `gpus:`"]
    result = []

    def fits(r: Runtime) -> bool:
        return holds(shape, r, allowed, overhead_b)

    # contexts in steps of 256
    best = largest(lambda k: fits(dataclasses.replace(runtime, ctx=k * 256)), 1, padded_ctx(runtime.ctx) // 256 - 1)
    if model.ctx == "max":  # ctx_min is per KV stream: -c over the streams, down to llama.cpp's step
        per_stream = best * 256 // streams(runtime) // CELLS * CELLS if best else 0
        if per_stream:
            slot = " per slot" if streams(runtime) > 1 else ""
            result.append(f"the largest context that fits is {per_stream}{slot} (ctx_min: {per_stream})")
    elif best:
        result.append(f"the largest context that fits is {best * 256} (ctx: {best * 256})")
    if (runtime.cache_type_k, runtime.cache_type_v) != ("q8_0", "q8_0"):
        q8 = Runtime(**{**vars(runtime), "cache_type_k": "q8_0", "cache_type_v": "q8_0"})
        saved = sum(kv_bytes(shape, runtime, u) - kv_bytes(shape, q8, u) for u in range(shape.n_layer))
        if saved >= MIB:
            outcome = "and then it fits" if fits(q8) else "but that is not enough on its own"
            result.append(
                f"a q8_0 KV cache (args: [--cache-type-k, q8_0, --cache-type-v, q8_0]) saves {_gib(saved)}, {outcome}"
            )
    if model.split_mode in ("layer", "auto"):  # auto has tried it only over directly linked GPUs
        instead = tensor_instead("tensor", model.backend, shape, runtime, allowed, {}, overhead_b)
        if instead is not None:
            on = ",".join(str(d.gpu) for d in instead[0].devices)
            result.append(f"it fits with split_mode: tensor on GPUs {on}")
    widest = max(allowed, key=lambda r: r.total_mib)
    for count in range(len(allowed) + 1, 17):
        clones = [UsableGpu(i, f"GPU-{i}", widest.name, widest.total_mib, widest.usable_mib) for i in range(count)]
        if holds(shape, runtime, clones, overhead_b):
            result.append(f"it would fit on {count} GPUs of {widest.total_mib / 1024:.0f} GiB like {widest.name}")
            break
    if not model.allow_cpu_offload:
        partial = most_layers(shape, runtime, allowed, overhead_b)
        if partial is not None:
            on_gpu = partial.gpu_layers
            result.append(
                f"with allow_cpu_offload: true, {on_gpu} of {shape.n_layer} layers run on the GPUs and "
                f"{shape.n_layer - on_gpu} on the CPU (much slower)"
            )
    return result
