"""All instances of a configuration: lookup, ports, placement on GPUs, start/stop/restart, events, and the
thermal guard's verdicts carried out.

The manager is built by the daemon's wiring (launcher/wiring.py) from parts made there: the instance table
it fills (supervise/table.py), the event bus, the GPU sampler, the child registry (which only the owner of
the state directory can have), the planner, the HTTP client, the state directory, what this host lends
(supervise/lending.py) and the peers. Planning runs in a worker thread: a refusal's suggestions must not
stall the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Collection, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx

from launcher import replicas
from launcher.backends import backend_for, planned_file, planned_model, with_command
from launcher.backends.base import hub_files_cached, with_local_projector
from launcher.config import GpuSettings, ModelSettings, Settings
from launcher.errors import ConflictError, LauncherError
from launcher.events import Bus
from launcher.gpu.sampler import Sampler
from launcher.hub.headers import hub_reader
from launcher.hub.planning import plan_from_hub
from launcher.hub_ref import HubRef
from launcher.plan.gguf import ModelFileError
from launcher.plan.planner import NOT_MEASURED, Measured, Placed, Planner, freed
from launcher.plan.remote import NO_REMOTE, Remote, remote_for
from launcher.rpc.peers import Peers
from launcher.schema import (
    Change,
    Event,
    GpuSample,
    InstanceChange,
    InstanceStatus,
    Plan,
    ReloadReport,
    RollReport,
    State,
)
from launcher.statedir.layout import StateDir
from launcher.statedir.measurements import MeasurementStore
from launcher.supervise import adoption, rolling, thermal
from launcher.supervise.degrade import Degrader
from launcher.supervise.downloads import begin_download
from launcher.supervise.handover import HandedServer
from launcher.supervise.instance import DaemonParts, Instance
from launcher.supervise.leftovers import ChildRegistry
from launcher.supervise.lending import Lending, claims_total
from launcher.supervise.measuring import MEASURED_BACKEND, Measuring
from launcher.supervise.ollama_downloads import begin_ollama_pull
from launcher.supervise.planning import PlanningThreads
from launcher.supervise.ports import pick_free_port
from launcher.supervise.slot_store import SlotStore, gib_bytes
from launcher.supervise.table import InstanceTable
from launcher.supervise.vram import VramGate
from launcher.supervise.writes import StateWrites

T = TypeVar("T")
# plans computing at once (threads): each is bounded (GGUF header checks, linear in the layers), and a
# start waits for a turn behind at most this many
_PLANNING_THREADS = 2
# The states in which an instance's server process must be alive.
_WITH_PROCESS = frozenset({State.LOADING, State.READY, State.UNHEALTHY, State.DRAINING})
# A server started and not yet ready, nor ended.
_ON_ITS_WAY = frozenset({State.STARTING, State.LOADING})


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
        self._placing = asyncio.Lock()  # one placement at a time: each plans around the last one's claim
        self._planning = PlanningThreads(_PLANNING_THREADS)
        self._hot: frozenset[int] = frozenset()  # GPUs in a hot episode
        self._tasks: set[asyncio.Task[object]] = set()
        self._rolls: dict[str, asyncio.Lock] = {}  # configured model -> held while its replicas roll
        self._restarting: list[str] = []  # a name per restart under way
        self._stopping = asyncio.Event()  # the daemon's own stop began (`drain_all`): rolls end
        self.writes = StateWrites()
        self.measuring = Measuring(MeasurementStore(state_dir.measured_file), sampler.identities)
        self._configured = replicas.expand(settings, [g.index for g in sampler.identities])
        self.instances = table.instances  # filled below: the degrader reads it
        self._degrader = None if peers is None else Degrader(peers, self.instances, self._place, self._spawn)
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

    def _others(self, instance: Instance) -> list[Instance]:
        """The other instances whose plans hold memory (their supervision runs): a plan for ``instance``
        goes around their claims."""
        return [i for i in self.instances.values() if i is not instance and i.active]

    def _remote(self, instance: Instance) -> Remote:
        """The peers' endpoints ``instance`` may be planned onto (none for `hosts: local`)."""
        if self.peers is None:
            return NO_REMOTE
        return remote_for(self.peers.statuses(), instance.settings.hosts, self.peers.holder(instance.name))

    async def _place(self, instance: Instance) -> None:
        """Port and placement of a start, one at a time: each plans around the last one's claim (runs under
        the instance's own lock)."""
        async with self._placing:
            # plan on the memory a stopped server is giving back, not without it
            await self._vram.await_vacated(instance.name)
            port = self._port_for(instance)
            samples, remote = self.sampler.latest(), self._remote(instance)
            claims = self.lending.claimed_mib(self._others(instance))

            def place() -> Placed:
                found = planned_file(instance.backend, instance.settings, instance.name)
                measured = self._measured(instance, found)
                settings = with_local_projector(instance.settings)
                return self.planner.place(instance.name, settings, found, samples, claims, remote, measured)

            try:
                placed = await self._planning.run(place)
            except ModelFileError as exc:  # the caller hears it; the instance shows it
                instance.record_refusal(exc)
                raise
            if self.peers is not None and placed.placement.rpc:  # the peers plan around it from now on
                await self.peers.claim(instance.name, placed.plan)
            # The instance's supervision task starts right after this returns, with no await between:
            # the next placement sees this one's claim.
            instance.placed(port, placed.placement, placed.plan)

    def _port_for(self, instance: Instance) -> int:
        """The instance's port: configured, kept from an earlier start, or the first free one of the range."""
        if instance.port is not None:
            return instance.port
        taken = [self.settings.daemon.port, *(i.port for i in self.instances.values() if i.port is not None)]
        return pick_free_port(*self.settings.daemon.instance_ports, taken)

    def _measured(self, instance: Instance, found: Path | None, estimate: bool = False) -> Measured:
        """What earlier runs measured for ``instance``'s next plan (in a planning thread: it reads the
        disk); nothing with ``estimate`` (`launcher plan --estimate`)."""
        if estimate:
            return NOT_MEASURED
        if instance.settings.backend != MEASURED_BACKEND:  # no check reads its buffers: nothing measured
            return Measured(overheads_mib=self.measuring.overheads_mib())
        try:
            binary = instance.backend.binary(instance.settings)
        except LauncherError:  # the start will say why
            return Measured(overheads_mib=self.measuring.overheads_mib())
        run = self.measuring.lookup(instance.settings, found, binary)
        return Measured(run, self.measuring.overheads_mib())

    async def plan(self, name: str, estimate: bool = False) -> Plan:
        """The plan for ``name``, with the command line and the environment: for a running instance the
        plan it runs with; otherwise one made now, against the GPUs and the other instances' claims (from
        the estimate alone with ``estimate``)."""
        instance = self.get(name)
        if instance.active and instance.plan is not None and not estimate:
            # The command its server was started with; between runs (backoff) the one the next run gets,
            # or why it cannot run (a binary removed meanwhile).
            if instance.running and instance.spec is not None:
                return with_command(instance.plan, instance.spec)
            spec = instance.backend.launch_spec(instance.settings, self._port_for(instance), instance.placement)
            return with_command(instance.plan, instance.command(spec))
        samples, remote = self.sampler.latest(), self._remote(instance)
        claims = self.lending.claimed_mib(self._others(instance))

        plan = await self._planning.run(
            functools.partial(self._planned, instance, samples, claims, remote, estimate), key=(name, estimate)
        )
        if plan.hub is not None:  # no command until its files are downloaded
            return plan
        spec = instance.backend.launch_spec(instance.settings, self._port_for(instance), self.planner.placement(plan))
        return with_command(plan, instance.command(spec))

    def _planned(
        self,
        instance: Instance,
        samples: list[GpuSample],
        claims: dict[int, int],
        remote: Remote,
        estimate: bool = False,
    ) -> Plan:
        """The plan of ``instance`` (in a planning thread): from its file and what its earlier runs measured
        (not with ``estimate``), or a hub model's not yet in the cache from its headers, before any download."""
        settings = instance.settings
        if isinstance(settings.model, HubRef) and not hub_files_cached(settings):
            reader = hub_reader(self.settings.hub, self._hub_headers_dir)
            return plan_from_hub(self.planner, reader, instance.name, settings, samples, claims, remote)
        found = planned_model(instance.backend, settings, instance.name)  # an Ollama model to pull: its size
        measured = self._measured(instance, found if isinstance(found, Path) else None, estimate)
        settings = with_local_projector(settings)
        return self.planner.plan(instance.name, settings, found, samples, claims, remote, measured=measured)

    async def await_vacated(self, name: str) -> None:
        """Until the memory that servers gave back lately shows free (or `gpus.vram_wait_s`): a decision
        about room for ``name`` made before would count what a server just stopped still holds."""
        await self._vram.await_vacated(name)

    async def in_planning_thread(self, work: Callable[[], T]) -> T:
        """``work`` (planning) in one of the planning threads, within their bound: the router's plans for
        an on-demand start wait their turn as a start's and `GET /plan`'s do."""
        return await self._planning.run(work)

    def planner_with_stopped(self, name: str) -> Callable[[Collection[str]], Plan]:
        """A function of instance names: the plan for ``name`` were those stopped, against the GPUs and
        claims as they are now (read here, on the loop; the function may run in a worker thread)."""
        instance = self.get(name)
        samples, remote = self.sampler.latest(), self._remote(instance)
        held = {i.name: i.placement.claims_mib for i in self._others(instance)}
        peers_mib = self.lending.claimed_mib(())  # the peers' claims alone

        def plan_without(stopped: Collection[str]) -> Plan:
            back = claims_total(mib for n, mib in held.items() if n in stopped)
            kept = claims_total([*(mib for n, mib in held.items() if n not in stopped), peers_mib])
            return self._planned(instance, list(freed(samples, back)), dict(kept), remote)

        return plan_without

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
            self._port_for(instance),
            functools.partial(self.plan, name),
            lambda: self._spawn(self._start_or_refuse(name)),
        ):
            return instance.status()  # an Ollama model not in its store: pulled first, as a hub model is
        await instance.start(prepare=self._place)
        return instance.status()

    async def stop(self, name: str) -> InstanceStatus:
        instance = self.get(name)
        await instance.stop()
        if self.peers is not None:
            await self.peers.release(name)
        return instance.status()

    def restarting(self) -> list[str]:
        """The instances and models a restart or a roll is under way for (an upgrade is refused meanwhile)."""
        rolling = [model for model, lock in self._rolls.items() if lock.locked()]
        return sorted({*self._restarting, *rolling})

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
            return await self._roll(name, members, self._restart_as_configured)
        instance = self.get(name)
        if not instance.active and not instance.downloading:  # nothing runs: a start (a download first, if due)
            return await self.start(name)
        await instance.restart(prepare=self._place)
        return instance.status()

    async def _restart_as_configured(self, instance: Instance) -> None:
        """A replica's restart in a model's roll, with the settings configured now: a reload's roll that
        stopped left the replicas after it with their old ones (and their old server)."""
        model = self._configured[instance.name][1]
        if model != instance.settings:
            await instance.restart_with(model, backend_for(model, self.settings.rpc), self._place)
            if instance.active:
                return
            # it did not run: restart_with only gave it its settings
        await instance.restart(prepare=self._place)

    async def _roll(self, model: str, names: list[str], act: Callable[[Instance], Awaitable[None]]) -> RollReport:
        """A rolling restart of ``names`` (replicas of ``model``) by ``act``; rolls of one model run one after
        another, never interleaved."""

        def replicas() -> dict[str, Instance]:
            # a replica a reload removes leaves its model at once (`reconfigure`), before it is stopped: the
            # roll leaves it out from then on, and never starts it again
            members = self._table.groups.get(model, ())
            return {n: self.instances[n] for n in names if n in members}

        async with self._rolls.setdefault(model, asyncio.Lock()):  # the daemon's stop ends it
            return await rolling.roll_unless(self._stopping, model, replicas, act, self.publish)

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

    def all_ready(self, names: list[str]) -> bool:
        """Each is ready, and its server process lives (asked of the system, not of our own records)."""
        return all(self.instances[name].state == State.READY and self.instances[name].alive for name in names)

    def lost_servers(self) -> list[str]:
        """The instances whose state says their server runs while no process lives (supervision lost it)."""
        return [name for name, i in self.instances.items() if i.state in _WITH_PROCESS and not i.alive]

    def health_warnings(self) -> list[str]:
        """What `/health` warns of: a lost server (see `lost_servers`), a state directory that cannot be
        written (the servers run on)."""
        lost = [
            f"{name} is {self.instances[name].state.value} but has no live server process"
            for name in self.lost_servers()
        ]
        return lost + ([self.writes.warning] if self.writes.warning is not None else [])

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
        for change in report.instances:
            if change.change == Change.ADDED:
                self._table.add(self._instance(change.name, *after[change.name]))
            elif change.change == Change.LIVE_UPDATED:
                instance = self.instances[change.name]
                instance.reconfigure(after[change.name][1], instance.backend)
            elif change.change == Change.STOPPED:
                self._table.ungroup(change.name)
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
        """The acts of a reload, after `reconfigure`, and what came of each change of ``report``: removed
        instances stopped and forgotten and changed ones restarted with their new settings (those that ran;
        one that did not is `updated`), together, a model's replicas rolling one at a time
        (supervise/rolling.py); then added autostart ones started (unless not ``autostart``: a daemon
        started without). A start that fails marks its instance failed, as at the daemon's start, and its
        change `failed` with the reason."""
        changes = report.instances
        restarted: dict[str, list[InstanceChange]] = {}  # configured model -> its changed instances
        for change in changes:
            if change.change == Change.RESTARTED:
                restarted.setdefault(change.model, []).append(change)
        removed, rolled = await asyncio.gather(
            asyncio.gather(*(self._remove(c) for c in changes if c.change == Change.STOPPED)),
            asyncio.gather(*(self._restart_changed(model, changed) for model, changed in restarted.items())),
        )
        outcomes = {outcome.name: outcome for outcome in [*removed, *(o for model in rolled for o in model)]}
        for change in changes:
            if autostart and change.change == Change.ADDED and self.instances[change.name].settings.autostart:
                failure = await self._start_or_refuse(change.name)
                outcomes[change.name] = await self._came_up(change) if failure is None else _failed(change, failure)
        return [outcomes.get(change.name, change) for change in changes]

    async def _came_up(self, change: InstanceChange) -> InstanceChange:
        """``change``, once the server it started is ready; `failed` with the reason when it ended first (or
        is still not ready after twice its load timeout: a wait for memory included)."""
        instance = self.instances[change.name]
        timeout_s = 2 * instance.settings.health.load_timeout
        try:
            await instance.wait_until(lambda i: i.state not in _ON_ITS_WAY, timeout_s)
        except TimeoutError:
            return _failed(change, f"not ready within {timeout_s:g}s ({instance.state.value})")
        if instance.state == State.READY:
            return change
        return _failed(change, f"{instance.state.value}: {instance.last_error or 'its server ended'}")

    async def _remove(self, change: InstanceChange) -> InstanceChange:
        """A removed instance: retired first, so that a start waiting on its lock during the stop's drain
        is refused, never spawning a server outside the table; stopped, then forgotten."""
        name = change.name
        self.instances[name].retire(f"{name} was removed from the configuration")
        with contextlib.suppress(ConflictError):  # not running
            await self.stop(name)
        self._table.remove(name)
        del self._configured[name]
        return change

    async def _restart_changed(self, model: str, changed: list[InstanceChange]) -> list[InstanceChange]:
        """The changed instances of configured ``model``: several replicas roll, one at a time; what came of
        each (a replica after the one that stopped the roll was not restarted: it keeps its old server)."""
        ran = {c.name: self.instances[c.name].active for c in changed}
        if len(changed) == 1:
            try:
                await self._restart_with(self.instances[changed[0].name])
            except LauncherError as exc:
                return [_failed(changed[0], exc.message)]
            return [await self._came_up(changed[0]) if ran[changed[0].name] else _updated(changed[0])]
        roll = await self._roll(model, [c.name for c in changed], self._restart_with)
        for name in roll.left_out:  # stopped by hand meanwhile: its next start takes the new settings
            if name in self.instances and not self.instances[name].active:
                with contextlib.suppress(LauncherError):  # the instance shows it
                    await self._restart_with(self.instances[name])

        def outcome(change: InstanceChange) -> InstanceChange:
            if change.name in roll.restarted:
                return change if ran[change.name] else _updated(change)
            if change.name in roll.left_out:
                return _updated(change)
            if change.name == roll.stopped_at:
                return _failed(change, roll.reason or "it did not come back")
            return _failed(change, f"not restarted: the rolling restart stopped at {roll.stopped_at}")

        return [outcome(c) for c in changed]

    async def _restart_with(self, instance: Instance) -> None:
        """A changed instance: restarted with its settings configured now if it ran, given them alone if not.
        One that cannot start again is marked failed, as at the daemon's start, and raises why (a roll stops
        there: the replicas after it keep their server)."""
        model = self._configured[instance.name][1]
        try:
            await instance.restart_with(model, backend_for(model, self.settings.rpc), self._place)
        except LauncherError as exc:
            instance.refuse(exc)
            raise
        except Exception as exc:  # a bug or a file nobody foresaw: that model fails, the daemon serves on
            error = LauncherError(f"unexpected error: {type(exc).__name__}: {exc}")
            instance.refuse(error)
            raise error from exc

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
        self._stopping.set()
        await asyncio.gather(*(i.drain() for i in self.instances.values() if i.active))

    async def stop_all(self) -> None:
        """Stop every server (TERM, wait, KILL), concurrently."""
        if self._degrader is not None:
            self._degrader.close()  # a degraded instance is not started again on the way out
        for task in list(self._tasks):  # first: one of them may be starting a degraded instance again
            with contextlib.suppress(asyncio.CancelledError, LauncherError):
                await task
        await asyncio.gather(*(i.stop() for i in self.instances.values() if i.active or i.downloading))


def _failed(change: InstanceChange, reason: str) -> InstanceChange:
    return change.model_copy(update={"change": Change.FAILED, "reason": reason})


def _updated(change: InstanceChange) -> InstanceChange:
    return change.model_copy(update={"change": Change.UPDATED})
