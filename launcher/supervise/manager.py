"""All instances of a configuration: lookup, ports, placement on GPUs, start/stop/restart, events,
the GPU sampler's lifecycle, and shutdown of everything."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import httpx

from launcher.backends import Placement, backend_for
from launcher.config import ModelSettings, Settings
from launcher.errors import ConfigError, LauncherError, NotFoundError, StartError
from launcher.gpu import visibility_env
from launcher.gpu.base import NoGpus
from launcher.gpu.sampler import Sampler
from launcher.gpu.sim import SimBackend
from launcher.gpu.types import GpuSample
from launcher.plan.estimate import ModelShape, size_only
from launcher.plan.gguf import read_gguf
from launcher.plan.planner import Plan, make_plan
from launcher.supervise.instance import Event, Instance, InstanceStatus, State, Surroundings
from launcher.supervise.leftovers import ChildRegistry
from launcher.supervise.ports import pick_free_port
from launcher.supervise.thermal import ThermalGuard

_EVENTS_KEPT = 500


def _nth_port(port: int | str, n: int) -> int | str:
    """Replicas of a model with a fixed port take consecutive ports."""
    return port + n if isinstance(port, int) else port


def _sum_claims(instances: Iterable[Instance]) -> dict[int, int]:
    """MiB per GPU index that the plans of ``instances`` take, added up."""
    totals: dict[int, int] = {}
    for instance in instances:
        for index, mib in instance.placement.claims_mib.items():
            totals[index] = totals.get(index, 0) + mib
    return totals


@functools.lru_cache(maxsize=64)
def _model_shape(path: Path, mtime_ns: int, size: int) -> ModelShape:
    """The model's shape, read once per version of the file (mtime and size are part of the key)."""
    return ModelShape.of(read_gguf(path))


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
        self.registry = ChildRegistry(settings.daemon.state_dir / "children.json")
        self._samples = asyncio.Event()  # set at every GPU sample: what the VRAM wait awaits
        self._vacated: dict[int, tuple[int, float]] = {}  # GPU -> (MiB a stopped server held, until)
        around = Surroundings(
            http=self._http,
            log_dir=self.log_dir,
            registry=self.registry,
            log_max_bytes=int(settings.daemon.log_max_mib * 1024 * 1024),
            log_keep=settings.daemon.log_keep,
            await_vram=self.await_vram,
            vacated=self.vacated,
            on_event=self.publish,
        )
        self.instances: dict[str, Instance] = {}
        for group, model in settings.models.items():
            for name, replica in self._replicas(group, model):
                self.instances[name] = Instance(name, replica, backend=backend_for(replica), around=around, group=group)
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
        """Stop what an earlier daemon left running, then start watching the GPUs (one reading of each
        before this returns)."""
        for leftover in self.registry.clean_leftovers():
            self.publish(Event.now("error", f"stopped a server an earlier daemon left running: {leftover}"))
        self.sampler.subscribe(self._thermal.check)
        self.sampler.subscribe(lambda _sample: self._samples.set())
        await self.sampler.start()

    async def await_vram(self, claims: Mapping[int, int], who: str) -> None:
        """Return once each GPU in ``claims`` has that many MiB free, or after `gpus.vram_wait_s`: memory a
        killed server held can take a moment to come back, and a start before it does runs out of it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.gpus.vram_wait_s
        told = False
        while True:
            free = {s.index: s.memory_free_mib for s in self.sampler.latest()}
            gpus = self.settings.gpus
            # What the plan needs there: its claim, with the margin and the GPU's reserve kept free.
            needed = {i: mib + gpus.margin_mib + gpus.reserve_mib.get(i, 0) for i, mib in claims.items()}
            short = {i: mib for i, mib in needed.items() if (free.get(i) or 0) < mib}
            if not short:
                return
            if not told:
                what = ", ".join(f"GPU {i} ({free.get(i)} of {mib} MiB free)" for i, mib in short.items())
                self.publish(Event.now("vram", f"{who}: waiting for memory to come back on {what}"))
                told = True
            remaining = deadline - loop.time()
            if remaining <= 0:
                self.publish(Event.now("vram", f"{who}: memory not back after {self.settings.gpus.vram_wait_s:g}s"))
                return
            self._samples.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._samples.wait(), remaining)

    def vacated(self, claims: Mapping[int, int]) -> None:
        """Note the memory a stopped server held: the next start there waits for it (see await_vram)."""
        until = time.monotonic() + self.settings.gpus.vram_wait_s
        for index, mib in claims.items():
            self._vacated[index] = (mib, until)

    def _replicas(self, group: str, model: ModelSettings) -> list[tuple[str, ModelSettings]]:
        """The instances of one configured model: itself, or one per replica, each on its own GPU and port."""
        if model.replicas == 1:
            return [(group, model)]
        seen = [g.index for g in self.sampler.identities]
        gpus = list(model.gpus) if isinstance(model.gpus, list) else seen
        count = len(gpus) if model.replicas == "per-gpu" else model.replicas
        if not gpus or count > len(gpus):
            raise ConfigError(
                f"models.{group}.replicas asks for {count or 'one per GPU'} but {len(gpus)} GPUs are there",
                hint="each replica runs on a GPU of its own",
            )
        return [
            (
                f"{group}@{i}",
                model.model_copy(
                    update={
                        "gpus": [gpus[i]],
                        "replicas": 1,
                        "port": model.port + i if isinstance(model.port, int) else "auto",
                    }
                ),
            )
            for i in range(count)
        ]

    def get(self, name: str) -> Instance:
        if name in self.instances:
            return self.instances[name]
        members = self.group(name)
        if members:
            raise NotFoundError(f"{name} runs as replicas: act on them", hint=f"replicas: {', '.join(members)}")
        self.settings.model(name)  # raises NotFoundError naming the configured models
        raise NotFoundError(f"no instance named {name!r}")

    def group(self, name: str) -> list[str]:
        """The instances of configured model ``name`` (its replicas, or itself)."""
        return [n for n, i in self.instances.items() if i.group == name]

    # ---- placement ----------------------------------------------------------------------------------

    async def _prepare(self, instance: Instance) -> None:
        now = time.monotonic()
        recent = {i: mib for i, (mib, until) in self._vacated.items() if until > now}
        if recent:  # plan on the memory a stopped server is giving back, not without it
            await self.await_vram(recent, instance.name)
            self._vacated.clear()
        self._assign_port(instance)
        self._place(instance)

    def _ports_taken(self) -> list[int]:
        return [self.settings.daemon.port, *(i.port for i in self.instances.values() if i.port is not None)]

    def _assign_port(self, instance: Instance) -> None:
        if instance.port is None:
            instance.port = pick_free_port(*self.settings.daemon.instance_ports, self._ports_taken())

    def _check_gpu_refs(self, instance: Instance) -> None:
        """The model's `gpus:` must name GPUs that are there (by index or UUID)."""
        seen = self.sampler.identities
        if instance.settings.gpus == "auto":
            return
        for ref in instance.settings.gpus:
            if not any(ref in (g.index, g.uuid) for g in seen):
                known = ", ".join(f"{g.index} ({g.uuid})" for g in seen) or "none"
                raise ConfigError(
                    f"models.{instance.name}.gpus names GPU {ref!r}, which is not there",
                    hint=f"GPUs seen: {known}",
                )

    def plan(self, name: str) -> Plan:
        """The plan for ``name``, with the command line and the environment: for a running instance the
        plan it runs with; otherwise one made now, against the GPUs and the other instances' claims."""
        instance = self.get(name)
        recorded = instance.plan if instance.active else None
        plan = recorded or self._plan(instance)
        placement = instance.placement if recorded else self._placement(plan)
        port = instance.port or pick_free_port(*self.settings.daemon.instance_ports, self._ports_taken())
        spec = instance.backend.launch_spec(instance.settings, port, placement)
        # The environment the launcher sets: what differs from its own.
        env = {k: v for k, v in spec.env.items() if os.environ.get(k) != v}
        return plan.model_copy(update={"command": spec.argv, "env": env})

    def _plan(self, instance: Instance) -> Plan:
        instance.check_model_file()
        self._check_gpu_refs(instance)
        found = instance.backend.model_file(instance.settings)
        if found is not None:
            stat = found.stat()
            shape = _model_shape(found, stat.st_mtime_ns, stat.st_size)
        else:  # checked above: a size is configured
            shape = size_only((instance.settings.ollama.size_mib or 0) * 1024 * 1024)
        others = _sum_claims(i for i in self.instances.values() if i is not instance and i.active)
        return make_plan(
            instance.name,
            instance.settings,
            shape,
            self.sampler.latest(),
            self.sampler.links,
            others,
            self.settings.gpus,
        )

    def _placement(self, plan: Plan) -> Placement:
        if not plan.devices:
            return Placement()
        by_index = {g.index: g for g in self.sampler.identities}
        return Placement(
            gpu_layers=plan.gpu_layers,
            tensor_split=tuple(plan.tensor_split),
            gpus=tuple(d.gpu for d in plan.devices),
            claims_mib=plan.claims_mib,
            env=visibility_env([by_index[d.gpu] for d in plan.devices]),
        )

    def _place(self, instance: Instance) -> None:
        """Plan the instance against what runs; refuse, with the numbers, what would not fit."""
        plan = self._plan(instance)
        if not plan.fits:
            raise StartError(plan.reason or f"{instance.name} does not fit", hint="; ".join(plan.suggestions) or None)
        instance.placement = self._placement(plan)
        instance.plan = plan

    def claimed_mib(self) -> Mapping[int, int]:
        """MiB per GPU held by the servers that run (by their plans)."""
        return _sum_claims(i for i in self.instances.values() if i.running)

    def instances_on(self, index: int) -> list[str]:
        return [name for name, i in self.instances.items() if i.active and index in i.placement.gpus]

    # ---- acts ---------------------------------------------------------------------------------------

    async def start(self, name: str) -> InstanceStatus:
        instance = self.get(name)
        await instance.start(prepare=functools.partial(self._prepare, instance))
        return instance.status()

    async def stop(self, name: str) -> InstanceStatus:
        instance = self.get(name)
        await instance.stop()
        return instance.status()

    async def restart(self, name: str) -> InstanceStatus:
        instance = self.get(name)
        await instance.restart(prepare=functools.partial(self._prepare, instance))
        return instance.status()

    async def autostart(self) -> None:
        """Start every autostart model; one that cannot start is marked failed, the rest go on."""
        for name in self.autostart_names():
            try:
                await self.start(name)
            except LauncherError as exc:
                self.instances[name].refuse(exc)

    def autostart_names(self) -> list[str]:
        return [name for name, instance in self.instances.items() if instance.settings.autostart]

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
