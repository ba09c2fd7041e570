"""All instances of a configuration: lookup, ports, placement on GPUs, start/stop/restart, events, and the
thermal guard's verdicts carried out.

The manager is built by the daemon's wiring (launcher/wiring.py) from parts made there: the instance table
it fills (supervise/table.py), the event bus, the GPU sampler, the child registry (which only the owner of
the state directory can have), the planner, the HTTP client, the peers' claims on this host's GPUs and the
peers. Planning runs in a worker thread: a refusal's suggestions must not stall the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterable, Mapping
from typing import Any, TypeVar

import httpx

from launcher import replicas
from launcher.backends import backend_for, planned_file, with_command
from launcher.config import Settings
from launcher.errors import LauncherError
from launcher.events import Bus
from launcher.gpu.sampler import Sampler
from launcher.plan.gguf import ModelFileError
from launcher.plan.model_plan import usable_gpus
from launcher.plan.planner import Placed, Planner, freed
from launcher.plan.remote import NO_REMOTE, Remote, remote_for
from launcher.rpc.claims import ClaimBook
from launcher.rpc.peers import Peers
from launcher.schema import ClaimRequest, Event, GpuSample, InstanceStatus, Plan, RpcClaim, RpcReport, State
from launcher.statedir.layout import StateDir
from launcher.supervise import thermal
from launcher.supervise.degrade import Degrader
from launcher.supervise.instance import Instance, Surroundings
from launcher.supervise.leftovers import ChildRegistry
from launcher.supervise.planning import PlanningThreads
from launcher.supervise.ports import pick_free_port
from launcher.supervise.rpc_report import lent, rpc_report
from launcher.supervise.table import InstanceTable
from launcher.supervise.writes import StateWrites

T = TypeVar("T")
# plans computing at once (threads): each is bounded (GGUF header checks, linear in the layers), and a
# start waits for a turn behind at most this many
_PLANNING_THREADS = 2
# The states in which an instance's server process must be alive.
_WITH_PROCESS = frozenset({State.LOADING, State.READY, State.UNHEALTHY})


def _sum_claims(instances: Iterable[Instance]) -> dict[int, int]:
    """MiB per GPU index that the plans of ``instances`` take, added up."""
    totals: dict[int, int] = {}
    for instance in instances:
        for index, mib in instance.placement.claims_mib.items():
            totals[index] = totals.get(index, 0) + mib
    return totals


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
        claims: ClaimBook,
        peers: Peers | None = None,
    ) -> None:
        """``table``: empty; the manager fills it with the configuration's instances. ``claims``: peers'
        claims on the GPUs this host's rpc-servers lend."""
        self.settings = settings
        self.sampler = sampler
        self.planner = planner
        self.peers = peers
        self.claims = claims
        self._table = table
        self._events = events
        self._samples = asyncio.Event()  # set at every GPU sample: what the VRAM wait awaits
        self._vacated: dict[int, tuple[int, float]] = {}  # GPU -> (MiB a stopped server held, until)
        self._released_at: dict[int, float] = {}  # GPU -> when a server on it last ended (epoch seconds)
        self._placing = asyncio.Lock()  # one placement at a time: each plans around the last one's claim
        self._planning = PlanningThreads(_PLANNING_THREADS)
        self._hot: frozenset[int] = frozenset()  # GPUs in a hot episode
        self._tasks: set[asyncio.Task[None]] = set()
        self.writes = StateWrites()
        around = Surroundings(
            http=http,
            state_dir=state_dir,
            registry=registry,
            log_max_bytes=int(settings.daemon.log_max_mib * 1024 * 1024),
            log_keep=settings.daemon.log_keep,
            await_vram=self.await_vram,
            vacated=self.vacated,
            on_event=events.publish,
            writes=self.writes,
            blocked=self._blocked,
        )
        self._configured = replicas.expand(settings, [g.index for g in sampler.identities])
        for name, (group, model) in self._configured.items():
            table.add(Instance(name, model, backend=backend_for(model, settings.rpc), around=around, group=group))
        self.instances = table.instances
        self._degrader = None if peers is None else Degrader(peers, self.instances, self._preparer, self._spawn)

    # ---- events ---------------------------------------------------------------------------------------

    def publish(self, event: Event) -> None:
        self._events.publish(event)

    def after_peers_read(self) -> None:
        """After each read of the peers: judge the instances that use their endpoints."""
        if self._degrader is not None:
            self._degrader.judge_all()

    def observe(self, sample: GpuSample) -> None:
        """Every GPU sample: wake what waits for memory, and carry out the thermal guard's verdict."""
        self._samples.set()
        gpus = self.settings.gpus
        verdict = thermal.judge(
            sample, self._hot, self.instances_on(sample.index), gpus.thermal_limit_c, gpus.thermal_action
        )
        self._hot = verdict.hot
        if verdict.message is not None:
            self.publish(Event.now("thermal", verdict.message, gpu=sample.index))
            for name in verdict.warned:
                self.instances[name].note("thermal", f"GPU {sample.index}: {verdict.message}")
        for name in verdict.stop:
            if self.instances[name].state == State.STOPPING:
                continue  # already on its way: one stop at a time
            self._spawn(self._stop_quietly(name))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` beside the caller; `stop_all` waits for it."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _blocked(self, instance: Instance) -> str | None:
        return None if self._degrader is None else await self._degrader.blocked(instance)

    async def _stop_quietly(self, name: str) -> None:
        with contextlib.suppress(LauncherError):  # already stopped meanwhile
            await self.stop(name)

    # ---- GPU memory coming back -------------------------------------------------------------------------

    async def await_vram(self, claims: Mapping[int, int], who: str) -> None:
        """Return once each GPU in ``claims`` has that many MiB free, or after `gpus.vram_wait_s`: memory a
        killed server held can take a moment to come back, and a start before it does runs out of it. Only
        a reading taken after the last server on a GPU ended counts: an older one still shows the memory
        as it was, or (read before that server took it) as free when it is not."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.gpus.vram_wait_s
        told = False
        while True:
            free = {
                s.index: s.memory_free_mib
                for s in self.sampler.latest()
                if s.time > self._released_at.get(s.index, 0.0)
            }
            gpus = self.settings.gpus
            # What the plan needs there: its claim, with the margin and the GPU's reserve kept free.
            needed = {i: mib + gpus.margin_mib + gpus.reserve_mib.get(i, 0) for i, mib in claims.items()}
            short = {i: mib for i, mib in needed.items() if (free.get(i) or 0) < mib}
            if not short:
                return
            if not told:
                what = ", ".join(
                    f"GPU {i} ({free[i]} of {mib} MiB free)" if i in free else f"GPU {i} (no reading since)"
                    for i, mib in short.items()
                )
                self.publish(Event.now("vram", f"{who}: waiting for memory to come back on {what}"))
                told = True
            remaining = deadline - loop.time()
            if remaining <= 0:
                self.publish(Event.now("vram", f"{who}: memory not back after {self.settings.gpus.vram_wait_s:g}s"))
                return
            unread = [i for i in claims if i not in free]  # no reading since the release: take one now
            self._samples.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.sampler.read_now(unread) if unread else self._samples.wait(), remaining)

    def vacated(self, claims: Mapping[int, int]) -> None:
        """Note the memory a stopped server held: the next start there waits for it (see await_vram)."""
        until, now = time.monotonic() + self.settings.gpus.vram_wait_s, time.time()
        for index, mib in claims.items():
            self._vacated[index] = (mib, until)
            self._released_at[index] = now

    # ---- lookup -----------------------------------------------------------------------------------------

    def get(self, name: str) -> Instance:
        replicas.lookup(self._configured, self.settings, name)  # raises NotFoundError saying what there is
        return self.instances[name]

    def group(self, name: str) -> list[str]:
        """The instances of configured model ``name`` (its replicas, or itself)."""
        return list(self._table.groups.get(name, ()))

    # ---- placement --------------------------------------------------------------------------------------

    def _claims_besides(self, instance: Instance) -> dict[int, int]:
        """MiB per GPU that the other instances' plans and the peers' claims hold."""
        totals = _sum_claims(i for i in self.instances.values() if i is not instance and i.active)
        for index, mib in self.claims.claims_mib().items():
            totals[index] = totals.get(index, 0) + mib
        return totals

    def _remote(self, instance: Instance) -> Remote:
        """The peers' endpoints ``instance`` may be planned onto (none for `hosts: local`)."""
        if self.peers is None:
            return NO_REMOTE
        return remote_for(self.peers.statuses(), instance.settings.hosts, self.peers.holder(instance.name))

    async def _prepare(self, instance: Instance) -> None:
        """Port and placement of a start, under the placement lock (runs under the instance's own lock)."""
        async with self._placing:
            await self._place(instance)

    async def _place(self, instance: Instance) -> None:
        """`_prepare`'s work, under the placement lock."""
        now = time.monotonic()
        recent = {i: entry for i, entry in self._vacated.items() if entry[1] > now}
        if recent:  # plan on the memory a stopped server is giving back, not without it
            await self.await_vram({i: mib for i, (mib, _until) in recent.items()}, instance.name)
            for index, entry in recent.items():  # a server that stopped meanwhile is still being waited for
                if self._vacated.get(index) == entry:
                    del self._vacated[index]
        instance.port = self._port_for(instance)
        samples, claims, remote = self.sampler.latest(), self._claims_besides(instance), self._remote(instance)

        def place() -> Placed:
            found = planned_file(instance.backend, instance.settings, instance.name)
            return self.planner.place(instance.name, instance.settings, found, samples, claims, remote)

        try:
            placed = await self._planning.run(place)
        except ModelFileError as exc:  # the caller hears it; the instance shows it
            instance.record_refusal(exc)
            raise
        if self.peers is not None and placed.placement.rpc:  # the peers plan around it from now on
            await self.peers.claim(instance.name, placed.plan)
        # The instance's supervision task starts right after this returns, with no await between:
        # the next placement sees this one's claim.
        instance.placement, instance.plan = placed.placement, placed.plan

    def _port_for(self, instance: Instance) -> int:
        """The instance's port: configured, kept from an earlier start, or the first free one of the range."""
        if instance.port is not None:
            return instance.port
        taken = [self.settings.daemon.port, *(i.port for i in self.instances.values() if i.port is not None)]
        return pick_free_port(*self.settings.daemon.instance_ports, taken)

    async def plan(self, name: str) -> Plan:
        """The plan for ``name``, with the command line and the environment: for a running instance the
        plan it runs with; otherwise one made now, against the GPUs and the other instances' claims."""
        instance = self.get(name)
        if instance.active and instance.plan is not None:
            plan, placement = instance.plan, instance.placement
        else:
            samples, claims, remote = self.sampler.latest(), self._claims_besides(instance), self._remote(instance)

            def make() -> Plan:
                found = planned_file(instance.backend, instance.settings, name)
                return self.planner.plan(name, instance.settings, found, samples, claims, remote)

            plan = await self._planning.run(make, key=name)
            placement = self.planner.placement(plan)
        return with_command(plan, instance.backend, instance.settings, self._port_for(instance), placement)

    async def in_planning_thread(self, work: Callable[[], T]) -> T:
        """``work`` (planning) in one of the planning threads, within their bound: the router's plans for
        an on-demand start wait their turn as a start's and `GET /plan`'s do."""
        return await self._planning.run(work)

    def planner_with_stopped(self, name: str) -> Callable[[Collection[str]], Plan]:
        """A function of instance names: the plan for ``name`` were those stopped, against the GPUs and
        claims as they are now (read here, on the loop; the function may run in a worker thread)."""
        instance = self.get(name)
        samples, remote = self.sampler.latest(), self._remote(instance)
        claims = {n: dict(i.placement.claims_mib) for n, i in self.instances.items() if i is not instance and i.active}
        claims[""] = self.claims.claims_mib()  # the peers' (no instance here is named "")

        def plan_without(stopped: Collection[str]) -> Plan:
            after, kept = freed(samples, claims, stopped)
            found = planned_file(instance.backend, instance.settings, name)
            return self.planner.plan(name, instance.settings, found, after, kept, remote)

        return plan_without

    # ---- lending to peers -------------------------------------------------------------------------------

    def _lendable_mib(self, besides: str | None = None) -> dict[int, int]:
        """What a llama-server elsewhere may use of each GPU, with every claim but ``besides``'s counted."""
        claims = _sum_claims(i for i in self.instances.values() if i.active)
        for index, mib in self.claims.claims_mib(besides).items():
            claims[index] = claims.get(index, 0) + mib
        return {r.index: r.usable_mib for r in usable_gpus(self.sampler.latest(), claims, self.settings.gpus)}

    def rpc_report(self) -> RpcReport:
        return rpc_report(self.instances.values(), self.sampler.latest(), self.claims, self._lendable_mib())

    def claim(self, request: ClaimRequest) -> list[RpcClaim]:
        endpoints = {address: i.placement.gpus for address, (i, _b) in lent(self.instances.values()).items()}
        return self.claims.register(request, endpoints, self._lendable_mib)

    def instances_on(self, index: int) -> list[str]:
        return self._table.on_gpu(index)

    # ---- acts -------------------------------------------------------------------------------------------

    def _preparer(self, instance: Instance) -> Callable[[], Awaitable[None]]:
        return functools.partial(self._prepare, instance)

    def note(self, name: str, kind: str, message: str) -> None:
        """Write ``message`` in instance ``name``'s history (the front door's word on it)."""
        self.instances[name].note(kind, message)

    async def start(self, name: str) -> InstanceStatus:
        instance = self.get(name)
        await instance.start(prepare=self._preparer(instance))
        return instance.status()

    async def stop(self, name: str) -> InstanceStatus:
        instance = self.get(name)
        await instance.stop()
        if self.peers is not None:
            await self.peers.release(name)
        return instance.status()

    async def restart(self, name: str) -> InstanceStatus:
        instance = self.get(name)
        await instance.restart(prepare=self._preparer(instance))
        return instance.status()

    async def autostart(self) -> None:
        """Start every autostart model; one that cannot start is marked failed, the rest go on."""
        for name in self.autostart_names():
            try:
                await self.start(name)
            except LauncherError as exc:
                self.instances[name].refuse(exc)
            except Exception as exc:  # a bug or a file nobody foresaw: that model fails, the daemon serves on
                self.instances[name].refuse(LauncherError(f"unexpected error: {type(exc).__name__}: {exc}"))

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

    # ---- reports ----------------------------------------------------------------------------------------

    def status(self, name: str, events: int = 50) -> InstanceStatus:
        return self.get(name).status(events=events, requests=self._table.requests_on(name))

    def statuses(self) -> list[InstanceStatus]:
        return [i.status(events=0, requests=self._table.requests_on(n)) for n, i in self.instances.items()]

    def gpu_samples(self) -> list[GpuSample]:
        return [s.model_copy(update={"instances": self.instances_on(s.index)}) for s in self.sampler.latest()]

    async def stop_all(self) -> None:
        """Stop every server (TERM, wait, KILL), concurrently."""
        if self._degrader is not None:
            self._degrader.close()  # a degraded instance is not started again on the way out
        for task in list(self._tasks):  # first: one of them may be starting a degraded instance again
            with contextlib.suppress(asyncio.CancelledError, LauncherError):
                await task
        await asyncio.gather(*(i.stop() for i in self.instances.values() if i.active))


def claimed_mib(table: InstanceTable, claims: ClaimBook) -> Mapping[int, int]:
    """MiB per GPU held by the servers that run (by their plans) and by peers' llama-servers on the GPUs
    this host lends (by their claims): what the simulated GPUs show as used."""
    totals = _sum_claims(i for i in table.instances.values() if i.running)
    for index, mib in claims.claims_mib().items():
        totals[index] = totals.get(index, 0) + mib
    return totals
