"""NVML, as the launcher reads it (launcher/gpu/nvml.py), against nvidia-smi: field by field. Pure, except
`query`, which runs the tool.

nvidia-smi's names for the fields the sampler reports; each pair is compared within a tolerance that
allows for a value that moves between the two reads (utilisation, power, memory in use).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from launcher.schema_gpus import GpuReading


@dataclass(frozen=True)
class Field:
    reading: str  # GpuReading's attribute
    smi: str  # nvidia-smi's --query-gpu name
    tolerance: Callable[[float], float]  # allowed |NVML - nvidia-smi| for nvidia-smi's value


def _within(absolute: float, relative: float = 0.0) -> Callable[[float], float]:
    return lambda value: max(absolute, abs(value) * relative)


FIELDS = (
    Field("memory_total_mib", "memory.total", _within(16, 0.01)),
    Field("memory_used_mib", "memory.used", _within(64, 0.01)),
    Field("temperature_c", "temperature.gpu", _within(2)),
    Field("utilization_pct", "utilization.gpu", _within(20)),
    Field("power_w", "power.draw", _within(20, 0.15)),
    Field("power_limit_w", "enforced.power.limit", _within(1)),
    Field("pcie_gen", "pcie.link.gen.current", _within(0)),
    Field("pcie_gen_max", "pcie.link.gen.max", _within(0)),
    Field("pcie_width", "pcie.link.width.current", _within(0)),
    Field("pcie_width_max", "pcie.link.width.max", _within(0)),
)
# The clock-event reasons the sampler names (nvml.py's bits), by nvidia-smi's per-reason fields.
REASONS = {
    "power-cap": "clocks_event_reasons.sw_power_cap",
    "hw-slowdown": "clocks_event_reasons.hw_slowdown",
    "sw-thermal": "clocks_event_reasons.sw_thermal_slowdown",
    "hw-thermal": "clocks_event_reasons.hw_thermal_slowdown",
    "power-brake": "clocks_event_reasons.hw_power_brake_slowdown",
}
QUERY = [f.smi for f in FIELDS] + list(REASONS.values())


def parse_gpu_line(line: str) -> dict[str, str]:
    """One `--query-gpu=QUERY --format=csv,noheader,nounits` line, by field name."""
    values = [v.strip() for v in line.split(",")]
    if len(values) != len(QUERY):
        raise ValueError(f"nvidia-smi gave {len(values)} values for {len(QUERY)} fields: {line!r}")
    return dict(zip(QUERY, values, strict=True))


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # [N/A], [Not Supported]
        return None


@dataclass(frozen=True)
class Row:
    field: str
    nvml: str
    smi: str
    agrees: bool | None  # None: one side has no value


def compare(reading: GpuReading, smi: Mapping[str, str]) -> list[Row]:
    rows = []
    for f in FIELDS:
        mine, theirs = getattr(reading, f.reading), _number(smi[f.smi])
        agrees = None if mine is None or theirs is None else abs(mine - theirs) <= f.tolerance(theirs)
        rows.append(Row(f"{f.reading} / {f.smi}", str(mine), smi[f.smi], agrees))
    active = {name for name, key in REASONS.items() if smi[key].lower() == "active"}
    known = all(smi[key].lower() in ("active", "not active") for key in REASONS.values())
    mine_reasons = set(reading.throttle)
    rows.append(
        Row(
            "throttle / clocks_event_reasons.*",
            ",".join(sorted(mine_reasons)) or "-",
            ",".join(sorted(active)) or "-",
            mine_reasons == active if known else None,
        )
    )
    return rows


def parse_apps(text: str) -> dict[int, int | None]:
    """`--query-compute-apps=pid,used_memory --format=csv,noheader,nounits`: MiB by pid."""
    apps: dict[int, int | None] = {}
    for line in text.strip().splitlines():
        pid, _, used = (v.strip() for v in line.partition(","))
        if pid.isdigit():
            apps[int(pid)] = int(used) if used.isdigit() else None
    return apps


def smi_line_of(reading: GpuReading) -> str:
    """What nvidia-smi would print for ``reading``: the rehearsal's stand-in for the tool."""
    values = [str(getattr(reading, f.reading)) if getattr(reading, f.reading) is not None else "[N/A]" for f in FIELDS]
    values += ["Active" if name in reading.throttle else "Not Active" for name in REASONS]
    return ", ".join(values)


def query(index: int, args: Sequence[str] = ()) -> str:
    """nvidia-smi's answer for GPU ``index``: the GPU fields, or ``args`` (e.g. compute apps)."""
    argv = [
        "nvidia-smi",
        "-i",
        str(index),
        *(args or [f"--query-gpu={','.join(QUERY)}"]),
        "--format=csv,noheader,nounits",
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout


def table(rows: Sequence[Row]) -> list[str]:
    marks = {True: "yes", False: "**NO**", None: "n/a"}
    lines = ["| field (NVML / nvidia-smi) | NVML | nvidia-smi | agree |", "|---|---|---|---|"]
    lines += [f"| {r.field} | {r.nvml} | {r.smi} | {marks[r.agrees]} |" for r in rows]
    return lines
