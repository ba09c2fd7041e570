"""What a model's settings and pass-through `args` mean for memory, as llama-server reads them: the
runtime the estimate is made for, the weights kept in host memory, and the flags the planner cannot
model, each named with its likely effect (a plan never ignores one silently).

Defaults are llama-server's (`common/arg.cpp`, `tools/server`): `-np` auto is 4 slots sharing one unified
KV cache ("n_parallel is set to auto, using n_parallel = 4 and kv_unified = true"); an explicit `-np N`
gives each slot its own stream of ctx/N cells unless `--kv-unified`; `-ub` 512, `-b` 2048 (the compute
buffer is reserved for min(ub, b) tokens); `-fa auto`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from launcher.config_model import ModelSettings
from launcher.plan.estimate import ModelShape, Runtime, flash_attention_default
from launcher.server_args import (
    BATCH,
    CACHE_TYPE_K,
    CACHE_TYPE_V,
    CTX,
    FLASH_ATTN,
    N_CPU_MOE,
    OVERRIDE_TENSOR,
    PARALLEL,
    UBATCH,
    arg_value,
    every_value,
    flash_attn,
    last_switch,
    tensor_overrides,
)

AUTO_SLOTS = 4
# llama.cpp's pattern for expert tensors (common/common.h LLM_FFN_EXPS_REGEX), for --cpu-moe and --n-cpu-moe.
_EXPERTS = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"

# Flags that change memory in ways the plan does not follow, and what they are likely to do.
_NOT_MODELLED: tuple[tuple[tuple[str, ...], str], ...] = (
    (("-nkvo", "--no-kv-offload"), "the KV cache stays in host memory: the plan counts it on the GPUs"),
    (("-md", "--model-draft", "--spec-draft-model", "-hfd", "--spec-draft-hf", "--spec-type"),
     "speculative decoding: a draft model's weights and cache (or extra recurrent rows) are not counted"),
    (("--lora", "--lora-scaled", "--control-vector"), "adapter weights are not counted"),
    (("-ncffn", "--n-cpu-ffn"), "dense FFN weights kept on the CPU are still counted on the GPUs"),
    (("--override-kv",), "metadata overrides may change the shape the plan read from the file"),
    (("-dev", "--device", "-mg", "--main-gpu"), "device choice: the plan assumes the GPUs it picked, in its order"),
    (("--kv-unified-per-slot",), "the shared KV cache is sized to slots x N cells, not to ctx"),
    (("-ngl", "--n-gpu-layers", "--gpu-layers"), "overrides the planned layer count"),
    (("-ts", "--tensor-split"), "overrides the planned split"),
    (("-fit", "--fit"), "--fit on re-decides layers and context at load time"),
    (("-hf", "--hf-repo", "-mmu", "--mmproj-url"), "a downloaded file is not read: its size is not counted"),
    (("-cram", "--cache-ram", "-ctxcp", "--ctx-checkpoints", "--swa-checkpoints"),
     "host memory for the prompt cache and checkpoints is not counted"),
)  # fmt: skip


def host_weights(shape: ModelShape, args: Sequence[str]) -> tuple[int, ...]:
    """Per layer, the bytes of tensors that -ot (to a CPU buffer), --cpu-moe and --n-cpu-moe keep in host
    memory. llama.cpp checks the overrides in order and takes the first pattern that matches
    (std::regex_search); --cpu-moe and --n-cpu-moe add theirs after the -ot ones."""
    overrides = [pair for value in every_value(args, *OVERRIDE_TENSOR) for pair in tensor_overrides(value)]
    if last_switch(args, ("-cmoe", "--cpu-moe"), ()):
        overrides.append((_EXPERTS, "CPU"))
    n_cpu_moe = int(arg_value(args, *N_CPU_MOE) or 0)
    overrides += [(rf"blk\.{il}{_EXPERTS}", "CPU") for il in range(n_cpu_moe)]
    if not overrides:
        return ()
    compiled = [(re.compile(pattern), target.upper().startswith("CPU")) for pattern, target in overrides]
    kept = [0] * shape.n_layer
    for layer, name, size in shape.layer_tensors:
        to_host = next((host for pattern, host in compiled if pattern.search(name)), False)
        kept[layer] += size if to_host else 0
    return tuple(kept)


def runtime_for(model: ModelSettings, shape: ModelShape, on_gpu: bool = True, projector_bytes: int = 0) -> Runtime:
    """The runtime from the model's `ctx` and the options in its pass-through `args` (checked when the
    configuration was loaded)."""
    args = model.args
    flash = arg_value(args, *FLASH_ATTN)
    flash_on = None if flash is None else flash_attn(flash)
    slots = int(arg_value(args, *PARALLEL) or -1)
    unified = last_switch(args, ("-kvu", "--kv-unified"), ("-no-kvu", "--no-kv-unified"))
    return Runtime(
        # the launcher writes --ctx-size before the args: a -c among them is the one llama-server keeps
        # (`ctx: max` is sized later, by plan/context.py)
        ctx=int(arg_value(args, *CTX) or (model.ctx if isinstance(model.ctx, int) else 0)) or shape.context_length,
        cache_type_k=arg_value(args, *CACHE_TYPE_K) or "f16",
        cache_type_v=arg_value(args, *CACHE_TYPE_V) or "f16",
        flash_attn=flash_attention_default(shape, on_gpu) if flash_on is None else flash_on,
        ubatch=min(int(arg_value(args, *UBATCH) or 512), int(arg_value(args, *BATCH) or 2048)),
        parallel=AUTO_SLOTS if slots == -1 else slots,
        kv_unified=(slots == -1) if unified is None else unified,
        swa_full=bool(last_switch(args, ("--swa-full",), ())),
        host_weights=host_weights(shape, args),
        # --no-mmproj-offload keeps the projector in host memory
        projector_bytes=projector_bytes
        if last_switch(args, ("--mmproj-offload",), ("--no-mmproj-offload",)) in (None, True)
        else 0,
    )


def not_modelled(args: Sequence[str]) -> list[str]:
    """Each flag in ``args`` whose effect on memory the plan does not follow, with that effect."""
    present = {arg.partition("=")[0] for arg in args}
    found = [f"{flag}: {effect}" for flags, effect in _NOT_MODELLED for flag in flags if flag in present]
    split = arg_value(args, "-sm", "--split-mode")
    if split not in (None, "layer"):
        found.append(
            f"--split-mode {split}: overrides the planned mode; set `split_mode: {split}` instead, which the plan sizes"
        )
    for value in every_value(args, *OVERRIDE_TENSOR):
        for pattern, target in tensor_overrides(value):
            if not target.upper().startswith("CPU"):
                found.append(f"-ot {pattern}={target}: tensors moved to another device are counted on their layer's")
    if arg_value(args, "-mm", "--mmproj") is not None:
        found.append("--mmproj: the projector's compute buffer (it grows with the image size) is not counted")
    return found
