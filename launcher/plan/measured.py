"""A plan corrected by what a server measured (issue 23 point 3): pure, the measurement passed in.

After a llama-server is ready the launcher keeps what it reported allocating, per device in the plan's
order and per term, under a key of everything that changes it (launcher/supervise/measuring.py: the
model file's identity, the settings and args, the server binary's identity). The next plan for the same
key takes those terms instead of the estimate's, when its layout is the measured one (the same devices,
local or remote, with the same layers on each) at the same context (`ctx: max` chooses one each time):
a different split or context measures something else. Every term
is rounded up to whole MiB, as an estimate's is, so a measured plan is within 1 MiB of what was measured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from launcher.schema_gpus import GpuProcess
from launcher.schema_plans import DevicePlan, HostPlan, Plan, PlanCheck

# What one term may be: no server reports a negative size, or more than an exbibyte.
TermMib = Annotated[float, Field(ge=0, le=2**40, allow_inf_nan=False)]
# The name and date are shown in plans and messages, and a state file written by something else may hold
# strings of any size: bounded by what the launcher writes there (a model's name has at most 64 characters).
ModelName = Annotated[str, Field(min_length=1, max_length=64)]
Date = Annotated[str, Field(min_length=1, max_length=64)]  # ISO 8601 to the second: 25 characters
# A device's name as the server's log gives it (a GPU's model, `RPC0[HOST:PORT]`): tens of characters.
DeviceName = Annotated[str, Field(max_length=256)]
# More devices than llama.cpp's own bounds (GGML_RPC_MAX_SERVERS, its CUDA devices) by far.
_MAX_DEVICES = 256


class MeasuredTerms(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    weights: TermMib = 0.0  # model buffers and the projector
    kv: TermMib = 0.0
    state: TermMib = 0.0
    compute: TermMib = 0.0  # compute buffers and buffers of a kind the launcher does not know
    output: TermMib = 0.0


class MeasuredDevice(BaseModel):
    """One device of a measured run: what it was in the layout, and what it held."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    remote: bool  # an RPC device
    gpu: Annotated[int, Field(ge=0, le=_MAX_DEVICES)]  # its index (on its host)
    name: DeviceName
    layers: Annotated[int, Field(ge=0, le=2**20)]
    output_layer: bool
    terms: MeasuredTerms
    # NVML's reading of the server process on this GPU, when there was one (the driver's share is this
    # less the buffers)
    process_mib: Annotated[int, Field(ge=0, le=2**40)] | None = None


class Measurement(BaseModel):
    """What one run of a model measured, kept in the state directory."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelName  # the configured name, by which `launcher plan --forget` finds it
    date: Date
    ctx: Annotated[int, Field(ge=0)] = 0  # the context it ran with (`ctx: max` may choose another next time)
    devices: Annotated[list[MeasuredDevice], Field(max_length=_MAX_DEVICES)]
    host: MeasuredTerms


def _terms(found: dict[str, float]) -> MeasuredTerms:
    return MeasuredTerms(
        weights=found.get("weights", 0.0),
        kv=found.get("kv", 0.0),
        state=found.get("state", 0.0),
        compute=found.get("compute", 0.0) + found.get("other", 0.0),
        output=found.get("output", 0.0),
    )


def measurement_of(model: str, plan: Plan, check: PlanCheck, date: str) -> Measurement | None:
    """The measurement a check makes of ``plan``; None when the server's buffers and the plan's devices do
    not match one to one: a buffer on a device the plan does not have (nothing to file it under), or a
    planned device the log does not name (a server on simulated GPUs, numbering the launcher did not
    foresee): keeping nothing there would let the next plan claim nothing on it."""
    if check.unmatched or len(check.devices) != len(plan.devices) + 1:
        return None
    if not all(device.seen for device in check.devices[:-1]):
        return None
    *devices, host = check.devices
    return Measurement(
        model=model,
        date=date,
        ctx=plan.ctx,
        devices=[
            MeasuredDevice(
                remote=planned.endpoint is not None,
                gpu=planned.gpu,
                name=planned.name,
                layers=planned.layers,
                output_layer=planned.output_layer,
                terms=_terms({term: found.actual_mib for term, found in seen.terms.items()}),
                process_mib=seen.process_mib,
            )
            for planned, seen in zip(plan.devices, devices, strict=True)
        ],
        host=_terms({term: found.actual_mib for term, found in host.terms.items()}),
    )


def _layout(plan: Plan) -> list[tuple[bool, str, int, bool]]:
    return [(d.endpoint is not None, d.name, d.layers, d.output_layer) for d in plan.devices]


def _mib(measured: float) -> int:
    return math.ceil(round(measured, 2))  # rounded up, as an estimate is; 2 decimals: the log's own


def _device(planned: DevicePlan, measured: MeasuredTerms) -> DevicePlan:
    terms = {
        "weights_mib": max(0, _mib(measured.weights) - planned.projector_mib),  # the projector is in weights
        "kv_cache_mib": _mib(measured.kv),
        "recurrent_mib": _mib(measured.state),
        "compute_mib": _mib(measured.compute),
        "output_mib": _mib(measured.output),
    }
    total = sum(terms.values()) + planned.projector_mib + planned.overhead_mib
    return planned.model_copy(update={**terms, "total_mib": total, "free_after_mib": planned.usable_mib - total})


def _host(planned: HostPlan, measured: MeasuredTerms) -> HostPlan:
    return planned.model_copy(
        update={
            "weights_mib": max(0, _mib(measured.weights) - planned.projector_mib),
            "kv_cache_mib": _mib(measured.kv),
            "recurrent_mib": _mib(measured.state),
            "compute_mib": _mib(measured.compute),
            "output_mib": _mib(measured.output),
        }
    )


def with_measured(plan: Plan, measurement: Measurement | None) -> Plan:
    """``plan`` with the measured terms where its layout is the measured one; else ``plan`` as it is. A
    measured plan that no longer fits a GPU says so (the estimate was short there)."""
    if measurement is None or not plan.fits:
        return plan
    measured_layout = [(d.remote, d.name, d.layers, d.output_layer) for d in measurement.devices]
    if measured_layout != _layout(plan) or measurement.ctx != plan.ctx:
        return plan
    devices = [_device(d, m.terms) for d, m in zip(plan.devices, measurement.devices, strict=True)]
    short = [d for d in devices if d.endpoint is None and d.free_after_mib < 0]
    update: dict[str, object] = {"devices": devices, "host": _host(plan.host, measurement.host)}
    update["measured"] = measurement.date
    if short:
        worst = short[0]
        update["fits"] = False
        update["reason"] = (
            f"{plan.model} measured {worst.total_mib} MiB on GPU {worst.gpu} ({measurement.date}) "
            f"but only {worst.usable_mib} MiB is usable there"
        )
        update["suggestions"] = [*plan.suggestions, f"`launcher plan --forget {plan.model}` plans from the estimate"]
    return plan.model_copy(update=update)


def with_process_mib(
    check: PlanCheck, plan: Plan, pid: int, processes: Mapping[int, tuple[GpuProcess, ...] | None]
) -> PlanCheck:
    """``check`` with what the GPU reading says process ``pid`` holds on each of the plan's local GPUs
    (``processes``: each GPU's processes, by index; None or a hidden size: no reading)."""
    devices = list(check.devices)
    for i, planned in enumerate(plan.devices):
        if planned.endpoint is not None:
            continue
        found = [p.used_mib for p in processes.get(planned.gpu) or () if p.pid == pid and p.used_mib is not None]
        if found:
            devices[i] = devices[i].model_copy(update={"process_mib": found[0]})
    return check.model_copy(update={"devices": devices})


def driver_share_mib(measurement: Measurement) -> dict[int, int]:
    """The driver's own share of each measured local GPU, by its index: the process's memory less the
    server's buffers there (rounded up; never below zero)."""
    return {
        device.gpu: max(0, math.ceil(device.process_mib - sum(device.terms.model_dump().values())))
        for device in measurement.devices
        if not device.remote and device.process_mib is not None
    }
