"""All instances of a configuration: lookup, ports, placement on GPUs, start/stop/restart, events, and the
thermal guard's verdicts carried out.

The manager is built by the daemon's wiring (launcher/wiring.py) from parts made there: the instance table
it fills (supervise/table.py), the event bus, the GPU sampler, the child registry (which only the owner of
the state directory can have), the planner, the HTTP client, the state directory, what this host lends
(supervise/lending.py) and the peers. Its parts: where an instance starts (placing.py), what a reload
changes (reload_changes.py), the rolls (rolling.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Collection, Coroutine, Sequence
from typing import Any, TypeVar

import httpx

from launcher import replicas
from launcher.backends import backend_for
from launcher.config import Settings
from launcher.config_gpus import GpuSettings
from launcher.config_model import ModelSettings
from launcher.errors import ConflictError, LauncherError
from launcher.events import Bus
from launcher.gpu.sampler import Sampler
from launcher.hub_ref import HubRef
from launcher.plan.planner import Planner
from launcher.rpc.peers import Peers
from launcher.schema_gpus import GpuSample
from launcher.schema_instances import Event, InstanceStatus, State
from launcher.schema_plans import Plan
from launcher.schema_reload import Change, InstanceChange, ReloadReport, RollReport
from launcher.statedir.layout import StateDir
from launcher.statedir.measurements import MeasurementStore
from launcher.supervise import adoption, rolling, thermal
from launcher.supervise.degrade import Degrader
from launcher.supervise.downloads import begin_download
from launcher.supervise.handover import HandedServer
from launcher.supervise.instance import Instance
from launcher.supervise.leftovers import ChildRegistry
from launcher.supervise.lending import Lending
from launcher.supervise.measuring import Measuring
from launcher.supervise.ollama_downloads import begin_ollama_pull
from launcher.supervise.parts import DaemonParts
from launcher.supervise.placing import Placer
from launcher.supervise.reload_changes import ReloadChanges, take_changes
from launcher.supervise.slot_store import SlotStore, gib_bytes
from launcher.supervise.table import InstanceTable
from launcher.supervise.vram import VramGate
from launcher.supervise.writes import StateWrites

T = TypeVar("T")


class Manager:
    """The only way in to the processes: the API and the CLI act through it."""

    def __init__(
        self,
        settings: Settings,
        *,
        table: InstanceTable,
        events: Bus[Event],
        sampler: Sampler,
        registry: ChildRegistry,
        planner: Planner,
        http: httpx.AsyncClient,
        state_dir: StateDir,
        lending: Lending,
        peers: Peers | None = None,
    ) -> None:
        """``table``: empty; the manager fills it with the configuration's instances, which ``lending``
        reads. ``lending``: peers' claims on the GPUs this host's rpc-servers lend, and what may be lent."""
        self.settings = settings
        self.sampler = sampler
        self.planner = planner
        self.peers = peers
        self.lending = lending
        self._hub_headers_dir = state_dir.hub_headers_dir
        self._table = table
        self._events = events
        self._vram = VramGate(settings.gpus, sampler, self.publish)
        self._hot: frozenset[int] = frozenset()  # GPUs in a hot episode
        self._tasks: set[asyncio.Task[object]] = set()
        self._restarting: list[str] = []  # a name per restart under way
        self.writes = StateWrites()
        self.measuring = Measuring(MeasurementStore(state_dir.measured_file), sampler.identities)
        self._configured = replicas.expand(settings, [g.index for g in sampler.identities])
        self.instances = table.instances  # filled below: the placer and the degrader read it
        self._rolls = rolling.Rolls(table, self.publish)
        self._placer = Placer(
            settings,
            instances=self.instances,
            sampler=sampler,
            planner=planner,
            lending=lending,
            vram=self._vram,
            measuring=self.measuring,
            hub_headers_dir=state_dir.hub_headers_dir,
            peers=peers,
        )
        self._degrader = None if peers is None else Degrader(peers, self.instances, self._placer.place, self._spawn)
        self._reloads = ReloadChanges(
            self.instances,
            stop=self.stop,
            start_or_refuse=self._start_or_refuse,
            roll=self._rolls.roll,
            take_configured=self._take_configured,
            forget=self._forget,
        )
        self._parts = DaemonParts(
            http=http,
            state_dir=state_dir,
            registry=registry,
            log_max_bytes=int(settings.daemon.log_max_mib * 1024 * 1024),
            log_keep=settings.daemon.log_keep,
            vram=self._vram,
            on_event=events.publish,
            writes=self.writes,
            requests=table.requests,
            blocked=self._degrader,
            measuring=self.measuring,
            gpu_processes=sampler.processes,
            slot_store=SlotStore(
                settings.daemon.kv_cache_dir or state_dir.kv_cache_dir,
                gib_bytes(settings.daemon.kv_cache_max_gib),
                http,
            ),
        )
        for name, (group, model) in self._configured.items():
            table.add(self._instance(name, group, model))

    def _instance(self, name: str, group: str, model: ModelSettings) -> Instance:
        return Instance(name, model, backend=backend_for(model, self.settings.rpc), parts=self._parts, group=group)

    # ---- events ---------------------------------------------------------------------------------------

    def publish(self, event: Event) -> None:
        self._events.publish(event)

    def after_peers_read(self) -> None:
        """After each read of the peers: judge the instances that use their endpoints."""
        if self._degrader is not None:
            self._degrader.judge_all()

    def observe(self, sample: GpuSample) -> None:
        """Every GPU sample: wake what waits for memory, and carry out the thermal guard's verdict."""
        self._vram.sampled()
        gpus = self.settings.gpus
        on_gpu = self.with_instances(sample).instances
        verdict = thermal.judge(sample, self._hot, on_gpu, gpus.thermal_limit_c, gpus.thermal_action)
        self._hot = verdict.hot
        if verdict.message is not None:
            self.publish(Event.now("thermal", verdict.message, gpu=sample.index))
            for name in verdict.warned:
                self.instances[name].note("thermal", f"GPU {sample.index}: {verdict.message}")
        for name in verdict.stop:
            if self.instances[name].state in (State.DRAINING, State.STOPPING):
                continue  # already on its way: one stop at a time
            self._spawn(self._stop_quietly(name))

    def _spawn(self, work: Coroutine[Any, Any, object]) -> None:
        """Run ``work`` beside the caller; `stop_all` waits for it."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _stop_quietly(self, name: str) -> None:
        with contextlib.suppress(LauncherError):  # already stopped meanwhile
            await self.stop(name)

    # ---- lookup -----------------------------------------------------------------------------------------

    def get(self, name: str) -> Instance:
        replicas.lookup(self._configured, self.settings, name)  # raises NotFoundError saying what there is
        return self.instances[name]

    def group(self, name: str) -> list[str]:
        """The instances of configured model ``name`` (its replicas, or itself)."""
        return list(self._table.groups.get(name, ()))

    # ---- placement --------------------------------------------------------------------------------------

    async def plan(self, name: str, estimate: bool = False) -> Plan:
        """The plan for ``name``, with the command line and the environment (see `Placer.plan`)."""
        return await self._placer.plan(self.get(name), estimate)

    async def await_vacated(self, name: str) -> None:
        """Until the memory that servers gave back lately shows free (or `gpus.vram_wait_s`): a decision
        about room for ``name`` made before would count what a server just stopped still holds."""
        await self._vram.await_vacated(name)

    async def in_planning_thread(self, work: Callable[[], T]) -> T:
        """``work`` (planning) in one of the planning threads, within their bound (see `Placer`)."""
        return await self._placer.in_planning_thread(work)

    def planner_with_stopped(self, name: str) -> Callable[[Collection[str]], Plan]:
        """A function of instance names: the plan for ``name`` were those stopped (see `Placer`)."""
        return self._placer.planner_with_stopped(self.get(name))

    # ---- acts -------------------------------------------------------------------------------------------

    def note(self, name: str, kind: str, message: str) -> None:
        """Write ``message`` in instance ``name``'s history (the front door's word on it)."""
        instance = self.instances.get(name)
        if instance is not None:  # else a reload removed it while the front door had a request on it
            instance.note(kind, message)

    async def start(self, name: str) -> InstanceStatus:
        """Start ``name``; a hub model whose files are not in the cache downloads them first (the answer
        comes at once, downloading; the start follows the download)."""
        instance = self.get(name)
        if isinstance(instance.settings.model, HubRef) and await begin_download(
            instance,
            functools.partial(self.plan, name),
            self.settings.hub,
            self._hub_headers_dir,
            lambda: self._spawn(self._start_or_refuse(name)),
        ):
            return instance.status()
        if await begin_ollama_pull(
            instance,
            self._placer.port_for(instance),
            functools.partial(self.plan, name),
            lambda: self._spawn(self._start_or_refuse(name)),
        ):
            return instance.status()  # an Ollama model not in its store: pulled first, as a hub model is
        await instance.start(prepare=self._placer.place)
        return instance.status()

    async def stop(self, name: str) -> InstanceStatus:
        instance = self.get(name)
        await instance.stop()
        if self.peers is not None:
            await self.peers.release(name)
        return instance.status()

    def restarting(self) -> list[str]:
        """The instances and models a restart or a roll is under way for (an upgrade is refused meanwhile)."""
        return sorted({*self._restarting, *self._rolls.under_way()})

    async def restart(self, name: str) -> InstanceStatus | RollReport:
        """Restart instance ``name``; a model run as replicas (its name) rolls them, one at a time."""
        self._restarting.append(name)
        try:
            return await self._restart(name)
        finally:
            self._restarting.remove(name)

    async def _restart(self, name: str) -> InstanceStatus | RollReport:
        members = self.group(name)
        if name not in self.instances and members:  # replicas (`per-gpu` on one GPU: a roll of one)
            return await self._rolls.roll(name, members, self._restart_as_configured)
        instance = self.get(name)
        if not instance.active and not instance.downloading:  # nothing runs: a start (a download first, if due)
            return await self.start(name)
        await instance.restart(prepare=self._placer.place)
        return instance.status()

    async def _restart_as_configured(self, instance: Instance) -> None:
        """A replica's restart in a model's roll, with the settings configured now: a reload's roll that
        stopped left the replicas after it with their old ones (and their old server)."""
        if self._configured[instance.name][1] != instance.settings:
            await self._take_configured(instance)
            if instance.active:
                return
            # it did not run: restart_with only gave it its settings
        await instance.restart(prepare=self._placer.place)

    async def autostart(self) -> None:
        """Start every autostart model; one that cannot start is marked failed, the rest go on."""
        await self.start_each(self.autostart_names())

    async def start_each(self, names: Collection[str]) -> None:
        """Start each of ``names`` that does not run yet (an upgrade's adopted servers run already), in turn;
        one that cannot start is marked failed, the rest go on."""
        for name in dict.fromkeys(names):
            if name in self.instances and not self.instances[name].active:
                await self._start_or_refuse(name)

    async def adopt(self, servers: Sequence[HandedServer]) -> list[str]:
        """Take over the servers an upgrade handed over (supervise/adoption.py); the names of the instances
        whose server was not taken over (and was stopped), to start again."""
        claim = None if self.peers is None else self.peers.claim
        return await adoption.adopt_all(servers, self.instances, self.planner.placement, self._parts, claim)

    async def _start_or_refuse(self, name: str) -> str | None:
        """Start ``name`` where nobody waits for the answer: a start refused marks it failed, the rest go on.
        Why it failed, or None."""
        try:
            await self.start(name)
        except ConflictError as exc:
            if self.instances[name].active:  # started meanwhile by another (the front door) is no failure
                return None
            self.instances[name].refuse(exc)
            return exc.message
        except LauncherError as exc:
            self.instances[name].refuse(exc)
            return exc.message
        except Exception as exc:  # a bug or a file nobody foresaw: that model fails, the daemon serves on
            message = f"unexpected error: {type(exc).__name__}: {exc}"
            self.instances[name].refuse(LauncherError(message))
            return message
        return None

    def autostart_names(self) -> list[str]:
        return [name for name, instance in self.instances.items() if instance.settings.autostart]

    # ---- reloads -----------------------------------------------------------------------------------------

    def reconfigure(self, settings: Settings, report: ReloadReport) -> None:
        """Take the settings of a reload (those in effect, config_change.in_effect) at once: added instances
        join the table, stopped; live keys apply; removed instances leave their model (the front door no
        longer sees them) but stay known until `carry_out` has stopped them."""
        before = self._configured
        after = replicas.expand(settings, [g.index for g in self.sampler.identities])
        if settings.gpus != self.settings.gpus:
            self._use_gpu_settings(settings.gpus)
        if self.peers is not None and (settings.rpc, settings.peers) != (self.settings.rpc, self.settings.peers):
            self.peers.reconfigure(settings.rpc, settings.peers)
        self.settings = settings
        self._placer.reconfigure(settings)
        take_changes(self._table, report, after, self._instance)
        removed = {c.name: before[c.name] for c in report.instances if c.change == Change.STOPPED}
        self._configured = {**after, **removed}

    def _use_gpu_settings(self, gpus: GpuSettings) -> None:
        """The parts that read `gpus:` take the reload's (the thermal guard reads it from `settings`)."""
        self.sampler.reconfigure(
            poll_interval_s=gpus.poll_interval, history=gpus.history, process_every=gpus.process_every
        )
        self.planner.reconfigure(gpus)
        self.lending.reconfigure(gpus)
        self._vram.reconfigure(gpus)

    async def carry_out(self, report: ReloadReport, *, autostart: bool = True) -> list[InstanceChange]:
        """The acts of a reload, after `reconfigure` (see `ReloadChanges.carry_out`)."""
        return await self._reloads.carry_out(report, autostart=autostart)

    async def _take_configured(self, instance: Instance) -> None:
        """``instance`` restarted with its settings configured now if it runs, given them alone if not."""
        model = self._configured[instance.name][1]
        await instance.restart_with(model, backend_for(model, self.settings.rpc), self._placer.place)

    def _forget(self, name: str) -> None:
        """A removed instance, stopped: out of the table and the configuration."""
        self._table.remove(name)
        del self._configured[name]

    # ---- reports ----------------------------------------------------------------------------------------

    def status(self, name: str, events: int = 50) -> InstanceStatus:
        return self.get(name).status(events=events, requests=self._table.requests_on(name))

    def statuses(self) -> list[InstanceStatus]:
        return [i.status(events=0, requests=self._table.requests_on(n)) for n, i in self.instances.items()]

    def with_instances(self, sample: GpuSample) -> GpuSample:
        """``sample`` with the instances placed on its GPU now (those whose supervision runs)."""
        return sample.model_copy(update={"instances": self._table.on_gpu(sample.index)})

    def gpu_samples(self) -> list[GpuSample]:
        return [self.with_instances(s) for s in self.sampler.latest()]

    def close(self, reason: str) -> None:
        """The daemon is stopping: no instance starts from now on, a start or restart under way included
        (each is refused at its instance's lock), and no server that ends is restarted by the policy."""
        if self._degrader is not None:
            self._degrader.close()  # nor a degraded one when its peer comes back
        for instance in self.instances.values():
            instance.retire(reason)

    async def drain_all(self) -> None:
        """Drain every server at once (the daemon's own stop, before its API closes); each then waits
        draining, given no new request, for `stop_all`. Rolls under way end here."""
        self._rolls.end_all()
        await asyncio.gather(*(i.drain() for i in self.instances.values() if i.active))

    async def stop_all(self) -> None:
        """Stop every server (TERM, wait, KILL), concurrently."""
        if self._degrader is not None:
            self._degrader.close()  # a degraded instance is not started again on the way out
        for task in list(self._tasks):  # first: one of them may be starting a degraded instance again
            with contextlib.suppress(asyncio.CancelledError, LauncherError):
                await task
        await asyncio.gather(*(i.stop() for i in self.instances.values() if i.active or i.downloading))
