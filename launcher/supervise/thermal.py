"""The thermal guard as a decision: a GPU at or above `thermal_limit_c` is told once per crossing, naming
the instances on it, and with `thermal_action: stop` those instances are stopped. Pure: the facts come
in (the sample, the GPUs already hot, who runs on the GPU), the verdict goes out; the manager acts on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from launcher.schema_gpus import GpuSample

# Cooling this far below the limit ends the episode, so a GPU hovering at the limit is not a flood.
HYSTERESIS_C = 5.0


@dataclass(frozen=True)
class ThermalVerdict:
    hot: frozenset[int]  # the GPUs in a hot episode after this sample
    message: str | None = None  # what to tell about this GPU (None: nothing new)
    stop: tuple[str, ...] = ()  # the instances to stop
    warned: tuple[str, ...] = ()  # the instances to tell that their GPU is hot


def judge(
    sample: GpuSample,
    hot: frozenset[int],
    on_gpu: Sequence[str],
    limit_c: float,
    action: Literal["warn", "stop"],
) -> ThermalVerdict:
    temperature = sample.temperature_c
    if temperature is None:
        return ThermalVerdict(hot)
    if sample.index in hot:
        if temperature <= limit_c - HYSTERESIS_C:
            return ThermalVerdict(hot - {sample.index}, f"{sample.name} back to {temperature:.0f} °C")
        # Told once; but with `stop`, an instance started on the GPU during the episode is stopped too.
        return ThermalVerdict(hot, stop=tuple(on_gpu) if action == "stop" else ())
    if temperature < limit_c:
        return ThermalVerdict(hot)
    names = tuple(on_gpu)
    on_it = ", ".join(names) if names else "no instance"
    stopping = action == "stop" and bool(names)
    what = f"stopping {on_it}" if stopping else f"running on it: {on_it}"
    message = f"{sample.name} at {temperature:.0f} °C, at or above the {limit_c:g} °C limit; {what}"
    return ThermalVerdict(hot | {sample.index}, message, stop=names if stopping else (), warned=names)
