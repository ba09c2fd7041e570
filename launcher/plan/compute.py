"""Compute buffers per device, as llama.cpp's scheduler sizes them. Pure arithmetic, in bytes.

llama_context reserves the worst-case graph (n_ubatch tokens over n_seq_max sequences, src/llama-context.cpp
sched_reserve / graph_reserve); ggml_backend_sched splits it by device and ggml-alloc gives each device
one buffer, reusing a tensor's memory after its last use (ggml/src/ggml-alloc.c). A device's buffer is
therefore the peak of its own layers (`LayerWork.peak`, the largest layer's, not their sum) plus what it
receives from other devices and keeps for the whole graph: the graph inputs it reads (the attention
masks, `n_kv x ubatch`, f16 with flash attention, f32 without; only those of the caches its layers read:
a device holding only sliding-window layers copies the window's mask, one holding only recurrent layers
none) and the activation row of the device before it. Split over several devices llama.cpp runs a
pipeline and keeps GGML_SCHED_MAX_COPIES (4) copies of every such input (ggml-backend.cpp
ggml_backend_sched_split_graph). A few f32 activation rows more were fitted to `-lv 4`'s sizes (llama.cpp
b11434, RPC and CPU backends); bench/accuracy.py and bench/accuracy_arch.py check it all.
"""

from __future__ import annotations

import functools
import itertools

from launcher.plan.arch import LayerWork
from launcher.plan.estimate import ModelShape, Runtime, context_cells, window_cells

_F32 = 4
_PIPELINE_COPIES = 4  # GGML_SCHED_MAX_COPIES


def pipeline_copies(devices: int, full_offload: bool) -> int:
    """Copies of each split's inputs: a model split over several devices runs as a pipeline (full
    offload only) so that micro-batches overlap."""
    return _PIPELINE_COPIES if devices > 1 and full_offload else 1


def cells_seen(shape: ModelShape, runtime: Runtime) -> dict[str, int]:
    """KV cells one sequence's attention reads, per mask: a stream's cells (the whole cache when unified)
    and, beside it, the sliding-window cache's."""
    per_stream, streams = context_cells(runtime.ctx, runtime.parallel, runtime.kv_unified)
    if not shape.swa_layers or runtime.swa_full:
        return {"full": per_stream, "window": per_stream}  # --swa-full: the window's layers read it all
    window = window_cells(per_stream, shape.sliding_window, runtime.parallel, streams == 1, runtime.ubatch)
    return {"full": per_stream, "window": window}


def _works(shape: ModelShape) -> tuple[LayerWork, ...]:
    """The layers' work; a shape read without it (a size-only model) has a plain FFN per layer."""
    return shape.work or (LayerWork("full", 3 * shape.n_ff),) * shape.n_layer


class DeviceCompute:
    """The compute buffer of any run of layers of one model and runtime, each answer computed once and in
    time independent of the run's length (and all of them in time linear in the layer count): a sparse
    table of range maxima over the layers' peaks, and per attention mask the prefix counts of the layers
    that read it."""

    def __init__(self, shape: ModelShape, runtime: Runtime, copies: int) -> None:
        self.works = _works(shape)
        self.n_layer = shape.n_layer
        self.copies = copies
        self.ubatch, self.seqs = runtime.ubatch, max(1, runtime.parallel)
        # level k: the largest peak of the 2^k layers from each one on
        self.peaks = [[w.peak * self.ubatch * _F32 + w.per_seq * self.seqs * _F32 for w in self.works]]
        while 2 ** len(self.peaks) <= len(self.works):
            below, half = self.peaks[-1], 2 ** (len(self.peaks) - 1)
            self.peaks.append(list(map(max, below[:-half], below[half:])))
        self.readers: dict[str, list[int]] = {}  # mask -> how many of the first i layers read it
        for attention in dict.fromkeys(w.attention for w in self.works if w.attention):
            self.readers[attention] = [0, *itertools.accumulate(w.attention == attention for w in self.works)]
        # a model whose layers hand nothing over: a device's buffer only grows with the layers it takes
        self.growing = not any(w.handoff_out for w in self.works)
        self.cells = cells_seen(shape, runtime)
        self.mask_cell = runtime.ubatch * (2 if runtime.flash_attn else 4)  # one KV cell's mask column
        # without flash attention a layer also holds its n_kv x ubatch x n_head f32 scores
        self.score_cell = 0 if runtime.flash_attn else runtime.ubatch * shape.n_head * _F32
        self.row = runtime.ubatch * shape.n_embd * _F32  # one f32 activation row per ubatch token
        self.known: dict[tuple[int, int, bool], int] = {}

    @classmethod
    @functools.lru_cache(maxsize=256)  # one model is placed on many candidate sets
    def of(cls, shape: ModelShape, runtime: Runtime, copies: int) -> DeviceCompute:
        return cls(shape, runtime, copies)

    def bytes(self, start: int, stop: int, first: bool) -> int:
        """The buffer of a device holding layers [start, stop) (none: almost nothing). ``first``: the
        pipeline's first device, which also keeps the copies of the pipeline's input rows."""
        if stop <= start:
            return 0
        key = (start, stop, first)
        if key not in self.known:
            self.known[key] = self._bytes(start, stop, first)
        return self.known[key]

    def _bytes(self, start: int, stop: int, first: bool) -> int:
        level = (stop - start).bit_length() - 1
        peak: int = max(self.peaks[level][start], self.peaks[level][stop - 2**level])
        masks = [mask for mask, readers in self.readers.items() if readers[stop] > readers[start]]
        peak = max(peak, max((self.cells[m] for m in masks), default=0) * self.score_cell)
        mask = sum(self.cells[m] for m in masks) * self.mask_cell
        handoff = self.works[start].handoff_in if not first and self._handoff(start) else 0
        handoff += self.works[stop - 1].handoff_out if stop < self.n_layer and self._handoff(stop) else 0
        pipeline = 2 * self.copies * self.row if first and self.copies > 1 else 0
        return peak + self.copies * (mask + self.row + handoff * self.ubatch * _F32) + 3 * self.row + pipeline

    def _handoff(self, layer: int) -> bool:
        """Whether the scheduler hands a mixer's tensors across a boundary before ``layer``: between two
        layers with handoffs (two Mamba or two RWKV layers; an attention layer on either side ends it)."""
        return layer > 0 and bool(self.works[layer - 1].handoff_out) and bool(self.works[layer].handoff_in)


def host_compute_bytes(shape: ModelShape, runtime: Runtime, copies: int = 1) -> int:
    """The CPU compute buffer llama.cpp keeps beside GPU ones (inputs, the embedding lookup): it builds
    every mask the graph reads."""
    cells = cells_seen(shape, runtime)
    kinds = {work.attention for work in _works(shape)} - {""}
    mask = sum(cells[k] for k in kinds) * runtime.ubatch * (2 if runtime.flash_attn else 4)
    rows = runtime.ubatch * shape.n_embd * _F32
    return copies * mask + (4 if copies == 1 else 10) * rows
