"""The thermal guard: a GPU at or above `thermal_limit_c` raises an event naming it and the instances on
it, once per crossing; with `thermal_action: stop` those instances are stopped."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Literal

from launcher.errors import LauncherError
from launcher.gpu.types import GpuSample
from launcher.supervise.instance import Event

if TYPE_CHECKING:
    from launcher.supervise.manager import Manager

# Cooling this far below the limit ends the episode, so a GPU hovering at the limit is not a flood.
_HYSTERESIS_C = 5.0


class ThermalGuard:
    def __init__(self, manager: Manager, limit_c: float, action: Literal["warn", "stop"]) -> None:
        self._manager = manager
        self._limit_c = limit_c
        self._action = action
        self._hot: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def check(self, sample: GpuSample) -> None:
        temperature = sample.temperature_c
        if temperature is None:
            return
        if sample.index in self._hot:
            if temperature <= self._limit_c - _HYSTERESIS_C:
                self._hot.discard(sample.index)
                self._manager.publish(
                    Event.now("thermal", f"{sample.name} back to {temperature:.0f} °C", gpu=sample.index)
                )
            return
        if temperature < self._limit_c:
            return
        self._hot.add(sample.index)
        names = self._manager.instances_on(sample.index)
        on_it = ", ".join(names) if names else "no instance"
        what = "stopping " + on_it if self._action == "stop" and names else f"running on it: {on_it}"
        message = f"{sample.name} at {temperature:.0f} °C, at or above the {self._limit_c:g} °C limit; {what}"
        self._manager.publish(Event.now("thermal", message, gpu=sample.index))
        for name in names:
            self._manager.instances[name].note("thermal", f"GPU {sample.index}: {message}")
            if self._action == "stop":
                task = asyncio.create_task(self._stop(name))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _stop(self, name: str) -> None:
        with contextlib.suppress(LauncherError):  # already stopped meanwhile
            await self._manager.stop(name)
