"""An rpc-server's plan: the GPUs it lends, each with the driver's context the server itself takes there.

It holds no model, so it has no layers, KV cache or split of its own: what a llama-server elsewhere puts
on these GPUs is that llama-server's plan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from launcher.config_gpus import GpuSettings
from launcher.config_model import ModelSettings
from launcher.plan.model_plan import usable_gpus
from launcher.schema_gpus import GpuSample
from launcher.schema_plans import DevicePlan, HostPlan, Plan

_LENDS = "lends these GPUs over RPC: what a llama-server puts on them is that llama-server's plan"


def lending_plan(
    name: str, model: ModelSettings, samples: Sequence[GpuSample], claims: Mapping[int, int], gpus: GpuSettings
) -> Plan:
    """The plan of rpc-server entry ``name``: every readable GPU for `gpus: auto`, else the ones it names,
    in its order (the order its devices have for the client)."""
    readable = usable_gpus(samples, claims, gpus)
    if model.gpus == "auto":
        lent = readable
        missing = []
    else:
        by_ref = {ref: gpu for gpu in readable for ref in (gpu.index, gpu.uuid)}
        lent = [by_ref[ref] for ref in model.gpus if ref in by_ref]
        missing = [str(ref) for ref in model.gpus if ref not in by_ref]
    overhead = gpus.overhead_mib
    devices = [
        DevicePlan(
            gpu=gpu.index,
            uuid=gpu.uuid,
            name=gpu.name,
            layers=0,
            output_layer=False,
            weights_mib=0,
            kv_cache_mib=0,
            compute_mib=0,
            overhead_mib=overhead,
            total_mib=overhead,
            usable_mib=gpu.usable_mib,
            free_after_mib=gpu.usable_mib - overhead,
        )
        for gpu in lent
    ]
    full = [str(d.gpu) for d in devices if d.free_after_mib < 0]
    reason = None
    if missing:
        reason = f"{name} lends GPU {', '.join(missing)}, which cannot be read"
    elif full:
        reason = f"{name} needs {overhead} MiB for the driver on GPU {', '.join(full)}, more than is usable there"
    return Plan(
        model="",
        backend=model.backend,
        fits=reason is None,
        reason=reason,
        suggestions=[],
        ctx=0,
        flash_attn=False,
        cache_type_k="",
        cache_type_v="",
        gpu_layers=0,
        devices=devices,
        host=HostPlan(weights_mib=0, kv_cache_mib=0, compute_mib=0),
        tensor_split=[],
        warnings=[_LENDS],
    )
