"""All instances of a configuration: lookup, ports, placement on GPUs, start/stop/restart, events,
the GPU sampler's lifecycle, and shutdown of everything."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Mapping

import httpx

from launcher.backends import Placement, backend_for
from launcher.config import Settings
from launcher.errors import ConfigError, LauncherError
from launcher.gpu import visibility_env
from launcher.gpu.base import NoGpus
from launcher.gpu.sampler import Sampler
from launcher.gpu.sim import SimBackend
from launcher.gpu.types import GpuIdentity, GpuSample
from launcher.supervise.instance import Event, Instance, InstanceStatus, State
from launcher.supervise.ports import pick_free_port
from launcher.supervise.thermal import ThermalGuard

# llama.cpp clamps -ngl to the model's layers + output: this means "every layer on the GPUs".
ALL_LAYERS = 999
_EVENTS_KEPT = 500


class Manager:
    """The only way in to the processes: the API and the CLI act through it."""

    def __init__(
        self,
        settings: Settings,
        *,
        sampler: Sampler | None = None,
        on_event: Callable[[Event], None] = lambda _e: None,
    ) -> None:
        self.settings = settings
        self.log_dir = settings.daemon.state_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.sampler = (
            sampler if sampler is not None else Sampler(NoGpus(), poll_interval_s=settings.gpus.poll_interval)
        )
        self.events: deque[Event] = deque(maxlen=_EVENTS_KEPT)
        self._on_event = on_event
        self._subscribers: set[asyncio.Queue[Event]] = set()
        self._http = httpx.AsyncClient()
        self.instances: dict[str, Instance] = {
            name: Instance(
                name,
                model,
                backend=backend_for(model),
                log_dir=self.log_dir,
                http=self._http,
                on_event=self.publish,
            )
            for name, model in settings.models.items()
        }
        if isinstance(self.sampler.backend, SimBackend):
            self.sampler.backend.usage = self.claimed_mib  # simulated memory follows our instances
        self._thermal = ThermalGuard(self, settings.gpus.thermal_limit_c, settings.gpus.thermal_action)

    def publish(self, event: Event) -> None:
        self.events.append(event)
        self._on_event(event)
        for queue in self._subscribers:
            with contextlib.suppress(asyncio.QueueFull):  # a reader that does not keep up loses events
                queue.put_nowait(event)

    def subscribe(self) -> asyncio.Queue[Event]:
        """A queue that receives every event from now on; `unsubscribe` it when done."""
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=_EVENTS_KEPT)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self._subscribers.discard(queue)

    async def open(self) -> None:
        """Start watching the GPUs (one reading of each before this returns)."""
        self.sampler.subscribe(self._thermal.check)
        await self.sampler.start()

    def get(self, name: str) -> Instance:
        self.settings.model(name)  # raises NotFoundError naming the configured models
        return self.instances[name]

    # ---- placement ----------------------------------------------------------------------------------

    def _prepare(self, instance: Instance) -> None:
        self._assign_port(instance)
        self._place(instance)

    def _assign_port(self, instance: Instance) -> None:
        if instance.port is None:
            first, last = self.settings.daemon.instance_ports
            taken = [i.port for i in self.instances.values() if i.port is not None]
            taken.append(self.settings.daemon.port)
            instance.port = pick_free_port(first, last, taken)

    def _chosen_gpus(self, instance: Instance) -> list[GpuIdentity]:
        """The GPUs named by the model's `gpus:` (indices or UUIDs); `auto` is every GPU seen."""
        seen = self.sampler.identities
        wanted = instance.settings.gpus
        if wanted == "auto":
            return list(seen)
        chosen = []
        for ref in wanted:
            match = [g for g in seen if ref in (g.index, g.uuid)]
            if not match:
                known = ", ".join(f"{g.index} ({g.uuid})" for g in seen) or "none"
                raise ConfigError(
                    f"models.{instance.name}.gpus names GPU {ref!r}, which is not there",
                    hint=f"GPUs seen: {known}",
                )
            chosen.append(match[0])
        return chosen

    def _place(self, instance: Instance) -> None:
        """Where the instance's layers go: every layer on the chosen GPUs, or the CPU when there are none."""
        gpus = self._chosen_gpus(instance)
        if not gpus:
            instance.placement = Placement()
            return
        split = instance.settings.tensor_split
        if isinstance(split, list) and len(split) > len(gpus):
            raise ConfigError(f"models.{instance.name}.tensor_split has {len(split)} entries for {len(gpus)} GPUs")
        instance.placement = Placement(
            gpu_layers=ALL_LAYERS,
            tensor_split=tuple(split) if isinstance(split, list) else (),
            gpus=tuple(g.index for g in gpus),
            env=visibility_env(gpus),
        )

    def claimed_mib(self) -> Mapping[int, int]:
        """MiB per GPU held by the instances that run (by their plans)."""
        totals: dict[int, int] = {}
        for instance in self.instances.values():
            if instance.active:
                for index, mib in instance.placement.claims_mib.items():
                    totals[index] = totals.get(index, 0) + mib
        return totals

    def instances_on(self, index: int) -> list[str]:
        return [name for name, i in self.instances.items() if i.active and index in i.placement.gpus]

    # ---- acts ---------------------------------------------------------------------------------------

    async def start(self, name: str) -> InstanceStatus:
        instance = self.get(name)
        await instance.start(prepare=lambda: self._prepare(instance))
        return instance.status()

    async def stop(self, name: str) -> InstanceStatus:
        instance = self.get(name)
        await instance.stop()
        return instance.status()

    async def restart(self, name: str) -> InstanceStatus:
        instance = self.get(name)
        await instance.restart(prepare=lambda: self._prepare(instance))
        return instance.status()

    async def autostart(self) -> None:
        """Start every autostart model; one that cannot start is marked failed, the rest go on."""
        for name in self.autostart_names():
            try:
                await self.start(name)
            except LauncherError as exc:
                self.instances[name].refuse(exc)

    def autostart_names(self) -> list[str]:
        return [name for name, model in self.settings.models.items() if model.autostart]

    def all_ready(self, names: list[str]) -> bool:
        return all(self.instances[name].state == State.READY for name in names)

    # ---- reports ------------------------------------------------------------------------------------

    def statuses(self) -> list[InstanceStatus]:
        return [instance.status(events=0) for instance in self.instances.values()]

    def gpu_samples(self) -> list[GpuSample]:
        return [s.model_copy(update={"instances": self.instances_on(s.index)}) for s in self.sampler.latest()]

    async def shutdown(self) -> None:
        """Stop every server (TERM, wait, KILL, concurrently), the GPU sampler and the HTTP client."""
        await asyncio.gather(*(i.stop() for i in self.instances.values() if i.active))
        await self.sampler.stop()
        await self._http.aclose()
