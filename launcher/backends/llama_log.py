"""What llama-server reports allocating, read from its load log, and the plan checked against it.

llama.cpp prints every backend buffer it allocates as it loads (`-lv 4` and above):

    load_tensors:        CUDA0 model buffer size =  3992.51 MiB
    load_tensors:   CPU_Mapped model buffer size =   281.81 MiB
    llama_kv_cache: RPC0[10.0.0.2:50052] KV buffer size =     0.44 MiB
    llama_memory_recurrent:        CPU RS buffer size =     1.50 MiB
    llama_context:  CUDA_Host  output buffer size =     0.49 MiB
    sched_reserve:      ROCm0 compute buffer size =   296.00 MiB
    clip_ctx: CLIP using CUDA0 backend ... model size: 851.20 MiB     (the projector, --mmproj)

A buffer is named by its backend device: CUDA0, ROCm0, Vulkan0... are this host's GPUs in the order the
server sees them (the launcher shows it exactly the planned ones, in the plan's order); `RPC<i>[HOST:PORT]`
is a remote device (this build names them all RPC0: told apart by the address); CPU, CPU_Mapped,
CPU_REPACK and `<GPU>_Host` (pinned) are the host's memory.

It is the backend's knowledge (the server's output format, as the command line is), so it lives beside
the command line; supervision asks it through the backend seam and knows no log format. Pure: text in.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from launcher.schema_plans import DeviceCheck, DevicePlan, HostPlan, Plan, PlanCheck, TermCheck

TERMS = ("weights", "kv", "state", "compute", "output", "other")
SOURCE = "llama-server's load log"
HOST = "CPU"  # what the host's memory is called in a check

# A whole line: this build's time and level (`0.00.090.180 I `), llama.cpp's function and the message. Only
# a line of that shape counts: a model's metadata printed in the log (`- kv 3: general.name str = ...`)
# can say anything, but not in that place.
_PREFIX = r"(?:\S+ [A-Z] )?\w+:\s+"
_MIB = r"(?P<mib>\d+(?:\.\d+)?) MiB"
_BUFFER = re.compile(_PREFIX + r"(?P<buffer>\S*[^\s:])\s+(?P<kind>[A-Za-z_]+) buffer size\s*=\s*" + _MIB)
# A multimodal projector (--mmproj) names its device, then its weights' size a few lines on (its compute
# buffers are _BUFFER lines).
_PROJECTOR_DEVICE = re.compile(_PREFIX + r"CLIP using (?P<buffer>\S+) backend")
_PROJECTOR_SIZE = re.compile(_PREFIX + r"model size:\s*" + _MIB)
_TERM_OF_KIND = {"model": "weights", "KV": "kv", "RS": "state", "compute": "compute", "output": "output"}
_RPC = re.compile(r"RPC\d+\[(?P<address>.+)\]")
_LOCAL_GPU = re.compile(r"(?P<kind>[A-Za-z]+)(?P<index>\d+)")


@dataclass(frozen=True)
class Where:
    """A device as the server's buffers name it: the host, an RPC endpoint, or this host's n-th GPU."""

    rpc: str | None = None  # HOST:PORT
    local_gpu: int | None = None  # the server's own numbering (CUDA1: 1)

    @property
    def host(self) -> bool:
        return self.rpc is None and self.local_gpu is None


@dataclass
class Reported:
    """MiB per term per device the server reported, and the names it used for them."""

    mib: dict[Where, dict[str, float]] = field(default_factory=dict)
    names: dict[Where, str] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)  # buffers of a device it cannot place

    @property
    def empty(self) -> bool:
        return not self.mib

    def of(self, where: Where) -> dict[str, float]:
        return self.mib.get(where, {})

    def total(self, where: Where) -> float:
        return sum(self.of(where).values())

    def _add(self, buffer: str, term: str, mib: float) -> None:
        if not math.isfinite(mib):  # hundreds of digits: no size a server reports
            return
        where = _where(buffer)
        if where is None:
            self.unknown.append(buffer)
            return
        terms = self.mib.setdefault(where, dict.fromkeys(TERMS, 0.0))
        terms[term] += mib
        self.names.setdefault(where, HOST if where.host else buffer)


def _where(buffer: str) -> Where | None:
    """Where a buffer named ``buffer`` lives; None for a name this reader does not know."""
    if found := _RPC.fullmatch(buffer):
        return Where(rpc=found["address"])
    if buffer.startswith("CPU") or buffer.endswith("_Host"):
        return Where()
    if found := _LOCAL_GPU.fullmatch(buffer):
        return Where(local_gpu=int(found["index"]))
    return None


def parse(log: str) -> Reported:
    """Every buffer the server reported in ``log`` (one run's output), summed per device and term."""
    reported = Reported()
    projector: str | None = None  # the device a projector just said it loads on
    # The regular expressions only on the lines that can match: over a whole -lv 4 log they cost 40 times more.
    for line in log.splitlines():
        if " buffer size" in line and (found := _BUFFER.fullmatch(line.strip())):
            reported._add(found["buffer"], _TERM_OF_KIND.get(found["kind"], "other"), float(found["mib"]))
        elif "CLIP using" in line and (found := _PROJECTOR_DEVICE.fullmatch(line.strip())):
            projector = found["buffer"]
        elif projector is not None and "model size:" in line and (found := _PROJECTOR_SIZE.fullmatch(line.strip())):
            reported._add(projector, "weights", float(found["mib"]))
            projector = None
    return reported


def parse_lines(lines: Iterable[str]) -> Reported:
    return parse("\n".join(lines))


def _planned_device(device: DevicePlan) -> dict[str, float]:
    weights = device.weights_mib + device.projector_mib
    terms = {"weights": weights, "kv": device.kv_cache_mib, "state": device.recurrent_mib}
    return {**dict.fromkeys(TERMS, 0.0), **terms, "compute": device.compute_mib, "output": device.output_mib}


def _planned_host(host: HostPlan) -> dict[str, float]:
    terms = {"weights": host.weights_mib + host.projector_mib, "kv": host.kv_cache_mib, "state": host.recurrent_mib}
    return {**dict.fromkeys(TERMS, 0.0), **terms, "compute": host.compute_mib, "output": host.output_mib}


def _check(name: str, planned: dict[str, float], actual: dict[str, float], **about: object) -> DeviceCheck:
    terms = {
        term: TermCheck(
            planned_mib=planned[term],
            actual_mib=round(actual.get(term, 0.0), 2),
            difference_mib=round(actual.get(term, 0.0) - planned[term], 2),
        )
        for term in TERMS
    }
    planned_mib, actual_mib = sum(planned.values()), round(sum(actual.values()), 2)
    return DeviceCheck.model_validate(
        {
            "device": name,
            "seen": bool(actual),
            "terms": terms,
            "planned_mib": planned_mib,
            "actual_mib": actual_mib,
            "difference_mib": round(actual_mib - planned_mib, 2),
            **about,
        }
    )


def check(plan: Plan, reported: Reported) -> PlanCheck:
    """The plan's devices (in llama.cpp's order: the peers' RPC devices, then this host's GPUs) and the
    host, each against what the server reported there. An RPC device is matched by its address, this
    host's n-th planned GPU by the server's number n (it sees exactly the planned GPUs, in that order)."""
    devices, matched = [], {Where()}
    local = 0
    for device in plan.devices:
        if device.endpoint is not None:
            where = Where(rpc=device.endpoint)
        else:
            where, local = Where(local_gpu=local), local + 1
        matched.add(where)
        name = reported.names.get(where, device.endpoint or f"GPU {device.gpu} ({device.name})")
        about = {"host": device.host, "gpu": device.gpu, "endpoint": device.endpoint}
        devices.append(_check(name, _planned_device(device), reported.of(where), **about))
    devices.append(_check(HOST, _planned_host(plan.host), reported.of(Where())))
    unmatched = [reported.names[w] for w in reported.mib if w not in matched] + reported.unknown
    return PlanCheck(source=SOURCE, devices=devices, unmatched=unmatched)
