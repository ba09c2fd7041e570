"""Where the layers go: the fewest GPUs that hold the model, and the split that llama.cpp will honour.

llama.cpp assigns whole layers: with `--tensor-split` proportions normalised to cumulative fractions c_d,
layer `il` (the output layer counting as `n_layer`) goes to the first device with c_d > il / (n_layer+1)
(full offload). A split written as layer counts therefore puts exactly those counts on each device,
which is how the planner writes it. Token embeddings always stay in host memory.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from launcher.gpu.types import Link
from launcher.plan.compute import DeviceCompute, host_compute_bytes, pipeline_copies
from launcher.plan.estimate import MIB, ModelShape, Runtime, kv_bytes, state_bytes

LOCAL = "local"


@dataclass(frozen=True)
class UsableGpu:
    """A GPU as the planner sees it: how much of it this instance may use. A peer's GPU, lent through
    its rpc-server at ``endpoint``, has that peer as ``host`` and the peer's index."""

    index: int
    uuid: str
    name: str
    total_mib: int
    usable_mib: int
    host: str = LOCAL
    endpoint: str = ""
    learned_overhead_b: int | None = None  # the driver's share measured on this GPU model and driver

    def overhead(self, overhead_b: int) -> int:
        """The driver's context this instance adds on the GPU: none on a lent one, where the peer's plan of
        its rpc-server already holds it (the rpc-server process is that context); what was measured on
        this GPU model and driver where it was, else ``overhead_b`` (gpus.overhead_mib)."""
        if self.endpoint:
            return 0
        return overhead_b if self.learned_overhead_b is None else self.learned_overhead_b


@dataclass(frozen=True)
class DeviceLoad:
    gpu: int
    uuid: str
    name: str
    layers: int  # repeating layers on it
    output: bool  # holds the output layer
    weights_b: int
    kv_b: int
    compute_b: int
    overhead_b: int
    usable_mib: int
    state_b: int = 0  # recurrent state (llama-server's "RS buffer")
    projector_b: int = 0  # the multimodal projector's weights (--mmproj), on the first device
    host: str = LOCAL
    endpoint: str = ""

    @property
    def total_b(self) -> int:
        return self.weights_b + self.kv_b + self.state_b + self.projector_b + self.compute_b + self.overhead_b

    @property
    def fits(self) -> bool:
        return self.total_b <= self.usable_mib * MIB


@dataclass(frozen=True)
class HostLoad:
    weights_b: int
    kv_b: int
    compute_b: int
    state_b: int = 0
    projector_b: int = 0


@dataclass(frozen=True)
class Layout:
    devices: tuple[DeviceLoad, ...]
    host: HostLoad
    gpu_layers: int  # -ngl: units (repeating layers + output) on the GPUs
    split: tuple[float, ...]  # --tensor-split, one entry per device ((): one device or none)
    tensor: bool = False  # -sm tensor: every device holds a share of every layer (tensor_plan.py)

    @property
    def fits(self) -> bool:
        return all(d.fits for d in self.devices)


def first_unit(n_layer: int, offloaded: int) -> int:
    """The first unit on a GPU when ``offloaded`` of the n_layer+1 units are: with all of them, layer 0;
    otherwise the output layer stays on the CPU and the GPUs take the last repeating layers."""
    return 0 if offloaded == n_layer + 1 else n_layer - offloaded


def device_weights(shape: ModelShape, runtime: Runtime, layer: int) -> int:
    """The weights of ``layer`` that go to its GPU: all but what -ot/--cpu-moe keep on the host."""
    return shape.layer_bytes[layer] - (runtime.host_weights[layer] if runtime.host_weights else 0)


def layout(
    shape: ModelShape,
    runtime: Runtime,
    gpus: Sequence[UsableGpu],
    counts: Sequence[int],
    overhead_b: int,
) -> Layout:
    """The loads when ``counts[d]`` consecutive units go to ``gpus[d]``: the last units of the model
    (the offloaded ones), the output layer among them when all of n_layer+1 are offloaded. A GPU that
    gets no unit is no device. The projector goes with the first device (mtmd loads it on the first GPU
    it is shown), or stays on the host without one."""
    kept = [(gpu, count) for gpu, count in zip(gpus, counts, strict=True) if count]
    gpus, counts = [r for r, _ in kept], [c for _, c in kept]
    n = shape.n_layer
    offloaded = sum(counts)
    full = offloaded == n + 1
    copies = pipeline_copies(len(gpus), full)
    first = first_unit(n, offloaded)
    compute = DeviceCompute.of(shape, runtime, copies)
    devices: list[DeviceLoad] = []
    unit = first
    for gpu, count in zip(gpus, counts, strict=True):
        units = range(unit, unit + count)
        repeating = [u for u in units if u < n]
        holds_output = n in units
        devices.append(
            DeviceLoad(
                gpu=gpu.index,
                uuid=gpu.uuid,
                name=gpu.name,
                layers=len(repeating),
                output=holds_output,
                weights_b=sum(device_weights(shape, runtime, u) for u in repeating)
                + (shape.output_bytes if holds_output else 0),
                kv_b=sum(kv_bytes(shape, runtime, u) for u in repeating),
                state_b=sum(state_bytes(shape, runtime, u) for u in repeating),
                projector_b=0 if devices else runtime.projector_bytes,
                compute_b=compute.bytes(unit, min(unit + count, n), first=not devices),
                overhead_b=gpu.overhead(overhead_b),
                usable_mib=gpu.usable_mib,
                host=gpu.host,
                endpoint=gpu.endpoint,
            )
        )
        unit += count
    on_cpu = range(0, first)
    on_host_b = sum(shape.layer_bytes[u] - device_weights(shape, runtime, u) for u in range(first, n))
    host = HostLoad(
        weights_b=shape.embedding_bytes
        + sum(shape.layer_bytes[u] for u in on_cpu)
        + on_host_b
        + (0 if full else shape.output_bytes),
        kv_b=sum(kv_bytes(shape, runtime, u) for u in on_cpu),
        compute_b=host_compute_bytes(shape, runtime, copies),
        state_b=sum(state_bytes(shape, runtime, u) for u in on_cpu),
        projector_b=0 if devices else runtime.projector_bytes,
    )
    split = tuple(float(c) for c in counts) if len(counts) > 1 else ()
    return Layout(devices=tuple(devices), host=host, gpu_layers=offloaded, split=split)


def counts_from_split(proportions: Sequence[float], units: int) -> list[int]:
    """How llama.cpp distributes ``units`` (full offload) for a `--tensor-split` of ``proportions``."""
    total = sum(proportions)
    cumulative = list(itertools.accumulate(p / total for p in proportions))
    counts = [0] * len(proportions)
    for il in range(units):
        position = il / units
        device = next((d for d, c in enumerate(cumulative) if c > position), len(cumulative) - 1)
        counts[device] += 1
    return counts


@dataclass(frozen=True)
class _Costs:
    """Bytes of each unit (repeating layers with their KV, then the output layer), computed once, and
    their running totals."""

    units: tuple[int, ...]
    totals: tuple[int, ...]  # totals[i]: the bytes of units[:i]
    compute: DeviceCompute
    projector: int  # the first GPU's, beside its compute buffer

    @classmethod
    @functools.lru_cache(maxsize=256)  # one model is placed on many candidate sets
    def of(cls, shape: ModelShape, runtime: Runtime, copies: int) -> _Costs:
        layers = [
            device_weights(shape, runtime, u) + kv_bytes(shape, runtime, u) + state_bytes(shape, runtime, u)
            for u in range(shape.n_layer)
        ]
        units = (*layers, shape.output_bytes)
        return cls(
            units,
            (0, *itertools.accumulate(units)),
            DeviceCompute.of(shape, runtime, copies),
            runtime.projector_bytes,
        )

    def overflows(self, start: int, last: int, first: bool, cap: float) -> bool:
        """Whether a GPU overflows ``cap`` bytes holding units [start, last] (``first``: the first GPU)."""
        held = self.totals[last + 1] - self.totals[start] + (self.projector if first else 0)
        return held + self.compute.bytes(start, min(last + 1, len(self.units) - 1), first) > cap


def _fill(costs: _Costs, gpus: Sequence[UsableGpu], units: int, overhead_b: int, ratio: float) -> list[int] | None:
    """Greedy, in order: each GPU takes consecutive units while it stays within ``ratio`` of its usable memory,
    its compute buffer counted for the layers it holds so far (and the projector on the first). Where
    the buffer only grows with the layers (no handoffs), so does what a GPU holds: the first unit that
    overflows it is found by bisection instead of unit by unit."""
    unit = first_unit(len(costs.units) - 1, units)
    end = unit + units
    counts: list[int] = []
    for gpu in gpus:
        cap = ratio * gpu.usable_mib * MIB - gpu.overhead(overhead_b)
        first, start = not any(counts), unit
        if costs.compute.growing:
            high = end
            while unit < high:
                middle = (unit + high) // 2
                unit, high = (unit, middle) if costs.overflows(start, middle, first, cap) else (middle + 1, high)
        else:
            while unit < end and not costs.overflows(start, unit, first, cap):
                unit += 1
        counts.append(unit - start)
    return counts if unit == end else None


def balanced(
    shape: ModelShape, runtime: Runtime, gpus: Sequence[UsableGpu], units: int, overhead_b: int
) -> Layout | None:
    """The split that fills every GPU to the same fraction of its usable memory, or None when they cannot hold it.

    The smallest common fill ratio for which the greedy fill succeeds is found by bisection; each GPU
    then carries load in proportion to what it can hold, so a 16 GB card is not filled like a 24 GB one.
    """
    costs = _Costs.of(shape, runtime, pipeline_copies(len(gpus), units == shape.n_layer + 1))
    if _fill(costs, gpus, units, overhead_b, 1.0) is None:
        return None
    low, high = 0.0, 1.0
    for _ in range(30):
        middle = (low + high) / 2
        if _fill(costs, gpus, units, overhead_b, middle) is None:
            low = middle
        else:
            high = middle
    counts = _fill(costs, gpus, units, overhead_b, high)
    assert counts is not None
    result = layout(shape, runtime, gpus, counts, overhead_b)
    return result if result.fits else None


def candidate_sets(
    gpus: Sequence[UsableGpu], size: int, links: dict[tuple[int, int], Link]
) -> list[tuple[UsableGpu, ...]]:
    """Sets of ``size`` GPUs, best first: all directly linked, then the most usable memory, then the lowest indices."""

    def direct(group: tuple[UsableGpu, ...]) -> bool:
        pairs = itertools.combinations(sorted(r.index for r in group), 2)
        return all(links.get(pair, Link.CPU).direct for pair in pairs)

    groups = list(itertools.combinations(gpus, size))
    groups.sort(key=lambda g: (not direct(g), -sum(r.usable_mib for r in g), [r.index for r in g]))
    return groups


def _sizes(shape: ModelShape, runtime: Runtime, usable: Sequence[UsableGpu], overhead_b: int) -> range:
    """The set sizes worth trying for full offload: from the first whose largest usable memories, less each GPU's
    overhead, could hold every unit and one compute buffer. No placement needs less than that, so the
    smaller sets are skipped without placing anything on them."""
    costs = _Costs.of(shape, runtime, 1)
    # every placement holds all units and at least one device's compute buffer, none smaller than one layer's
    need_b = sum(costs.units) + min(costs.compute.bytes(il, il + 1, False) for il in range(shape.n_layer))
    held_b = 0
    holds_b = sorted((r.usable_mib * MIB - r.overhead(overhead_b) for r in usable), reverse=True)
    for size, room_b in enumerate(holds_b, start=1):
        held_b += max(0, room_b)
        if held_b >= need_b:
            return range(size, len(usable) + 1)
    return range(0)


def _distinct_sets(gpus: Sequence[UsableGpu], size: int) -> Iterator[tuple[UsableGpu, ...]]:
    """One set of ``size`` GPUs (in their order) for each distinct sequence of usable MiB: for N identical
    GPUs, one set per size instead of every subset. Each next GPU is the first of its size after the last."""
    if size == 0:
        yield ()
        return
    seen: set[int] = set()
    for i in range(len(gpus) - size + 1):
        if gpus[i].usable_mib not in seen:
            seen.add(gpus[i].usable_mib)
            for rest in _distinct_sets(gpus[i + 1 :], size - 1):
                yield (gpus[i], *rest)


def _brimming(
    shape: ModelShape,
    runtime: Runtime,
    usable: Sequence[UsableGpu],
    overhead_b: int,
    filled: dict[tuple[int, ...], bool],
) -> Iterator[tuple[UsableGpu, ...]]:
    """Sets of GPUs, smallest first, that hold every unit when filled to the brim: `balanced`'s first test,
    so the only sets it can place the model on. Whether a set passes depends only on its GPUs' usable MiB
    in order (links merely order the sets): one set per distinct sequence is tried, ``filled`` keeps the
    answers."""
    for size in _sizes(shape, runtime, usable, overhead_b):
        for group in _distinct_sets(usable, size):
            key = tuple(r.usable_mib for r in group)
            if key not in filled:
                costs = _Costs.of(shape, runtime, pipeline_copies(size, True))
                filled[key] = _fill(costs, group, shape.n_layer + 1, overhead_b, 1.0) is not None
            if filled[key]:
                yield group


def fewest_gpus(
    shape: ModelShape, runtime: Runtime, gpus: Sequence[UsableGpu], links: dict[tuple[int, int], Link], overhead_b: int
) -> Layout | None:
    """Full offload on the fewest GPUs that hold the model: one GPU when one does (splitting costs speed);
    of the sets of that many, the first in `candidate_sets`' order. Sizes where no set passes `balanced`'s
    first test are skipped without listing their sets; sets that fail it are not placed."""
    usable = [r for r in gpus if r.usable_mib > 0]
    filled: dict[tuple[int, ...], bool] = {}
    for size, _ in itertools.groupby(_brimming(shape, runtime, usable, overhead_b, filled), key=len):
        for group in candidate_sets(usable, size, links):
            if filled.get(tuple(r.usable_mib for r in group), True):
                found = balanced(shape, runtime, group, shape.n_layer + 1, overhead_b)
                if found is not None:
                    return found
    return None


def holds(shape: ModelShape, runtime: Runtime, gpus: Sequence[UsableGpu], overhead_b: int) -> bool:
    """Whether `fewest_gpus` finds a set, without working out which (what refusals ask, many times over)."""
    usable = [r for r in gpus if r.usable_mib > 0]
    return any(
        balanced(shape, runtime, group, shape.n_layer + 1, overhead_b) is not None
        for group in _brimming(shape, runtime, usable, overhead_b, {})
    )


def most_layers(shape: ModelShape, runtime: Runtime, gpus: Sequence[UsableGpu], overhead_b: int) -> Layout | None:
    """Partial offload: the most repeating layers the GPUs hold, the rest (and the output) on the CPU."""
    low, high, best = 1, shape.n_layer, None
    while low <= high:
        middle = (low + high) // 2
        found = balanced(shape, runtime, gpus, middle, overhead_b)
        if found is None:
            high = middle - 1
        else:
            best, low = found, middle + 1
    return best
