"""Where and how an instance's next start runs: its port, and its plan against the GPUs, the other
instances' claims, the peers' endpoints and what its earlier runs measured, made one placement at a time.

Planning runs in a worker thread: a refusal's suggestions must not stall the API.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TypeVar

from launcher.backends import planned_file, planned_model, with_command
from launcher.backends.base import hub_files_cached, with_local_projector
from launcher.config import Settings
from launcher.errors import LauncherError
from launcher.gpu.sampler import Sampler
from launcher.hub.headers import hub_reader
from launcher.hub.planning import plan_from_hub
from launcher.hub_ref import HubRef
from launcher.plan.gguf import ModelFileError
from launcher.plan.planner import NOT_MEASURED, Measured, Placed, Planner, freed
from launcher.plan.remote import NO_REMOTE, Remote, remote_for
from launcher.rpc.peers import Peers
from launcher.schema_gpus import GpuSample
from launcher.schema_plans import Plan
from launcher.supervise.instance import Instance
from launcher.supervise.lending import Lending, claims_total
from launcher.supervise.measuring import MEASURED_BACKEND, Measuring
from launcher.supervise.planning import PlanningThreads
from launcher.supervise.ports import pick_free_port
from launcher.supervise.vram import VramGate

T = TypeVar("T")
# plans computing at once (threads): each is bounded (GGUF header checks, linear in the layers), and a
# start waits for a turn behind at most this many
_PLANNING_THREADS = 2


class Placer:
    def __init__(
        self,
        settings: Settings,
        *,
        instances: Mapping[str, Instance],
        sampler: Sampler,
        planner: Planner,
        lending: Lending,
        vram: VramGate,
        measuring: Measuring,
        hub_headers_dir: Path,
        peers: Peers | None,
    ) -> None:
        """``instances``: the manager's, as they come and go (a live view)."""
        self._settings = settings
        self._instances = instances
        self._sampler = sampler
        self._planner = planner
        self._lending = lending
        self._vram = vram
        self._measuring = measuring
        self._hub_headers_dir = hub_headers_dir
        self._peers = peers
        self._placing = asyncio.Lock()  # one placement at a time: each plans around the last one's claim
        self._planning = PlanningThreads(_PLANNING_THREADS)

    def reconfigure(self, settings: Settings) -> None:
        """Take a reload's settings (the daemon's port and instance ports, `hub:`)."""
        self._settings = settings

    def _others(self, instance: Instance) -> list[Instance]:
        """The other instances whose plans hold memory (their supervision runs): a plan for ``instance``
        goes around their claims."""
        return [i for i in self._instances.values() if i is not instance and i.active]

    def _remote(self, instance: Instance) -> Remote:
        """The peers' endpoints ``instance`` may be planned onto (none for `hosts: local`)."""
        if self._peers is None:
            return NO_REMOTE
        return remote_for(self._peers.statuses(), instance.settings.hosts, self._peers.holder(instance.name))

    async def place(self, instance: Instance) -> None:
        """Port and placement of a start, one at a time: each plans around the last one's claim (runs under
        the instance's own lock)."""
        async with self._placing:
            # plan on the memory a stopped server is giving back, not without it
            await self._vram.await_vacated(instance.name)
            port = self.port_for(instance)
            samples, remote = self._sampler.latest(), self._remote(instance)
            claims = self._lending.claimed_mib(self._others(instance))

            def place() -> Placed:
                found = planned_file(instance.backend, instance.settings, instance.name)
                measured = self._measured(instance, found)
                settings = with_local_projector(instance.settings)
                return self._planner.place(instance.name, settings, found, samples, claims, remote, measured)

            try:
                placed = await self._planning.run(place)
            except ModelFileError as exc:  # the caller hears it; the instance shows it
                instance.record_refusal(exc)
                raise
            if self._peers is not None and placed.placement.rpc:  # the peers plan around it from now on
                await self._peers.claim(instance.name, placed.plan)
            # The instance's supervision task starts right after this returns, with no await between:
            # the next placement sees this one's claim.
            instance.placed(port, placed.placement, placed.plan)

    def port_for(self, instance: Instance) -> int:
        """The instance's port: configured, kept from an earlier start, or the first free one of the range."""
        if instance.port is not None:
            return instance.port
        taken = [self._settings.daemon.port, *(i.port for i in self._instances.values() if i.port is not None)]
        return pick_free_port(*self._settings.daemon.instance_ports, taken)

    def _measured(self, instance: Instance, found: Path | None, estimate: bool = False) -> Measured:
        """What earlier runs measured for ``instance``'s next plan (in a planning thread: it reads the
        disk); nothing with ``estimate`` (`launcher plan --estimate`)."""
        if estimate:
            return NOT_MEASURED
        if instance.settings.backend != MEASURED_BACKEND:  # no check reads its buffers: nothing measured
            return Measured(overheads_mib=self._measuring.overheads_mib())
        try:
            binary = instance.backend.binary(instance.settings)
        except LauncherError:  # the start will say why
            return Measured(overheads_mib=self._measuring.overheads_mib())
        run = self._measuring.lookup(instance.settings, found, binary)
        return Measured(run, self._measuring.overheads_mib())

    async def plan(self, instance: Instance, estimate: bool = False) -> Plan:
        """The plan for ``instance``, with the command line and the environment: for a running instance the
        plan it runs with; otherwise one made now, against the GPUs and the other instances' claims (from
        the estimate alone with ``estimate``)."""
        if instance.active and instance.plan is not None and not estimate:
            # The command its server was started with; between runs (backoff) the one the next run gets,
            # or why it cannot run (a binary removed meanwhile).
            if instance.running and instance.spec is not None:
                return with_command(instance.plan, instance.spec)
            spec = instance.backend.launch_spec(instance.settings, self.port_for(instance), instance.placement)
            return with_command(instance.plan, instance.command(spec))
        samples, remote = self._sampler.latest(), self._remote(instance)
        claims = self._lending.claimed_mib(self._others(instance))

        plan = await self._planning.run(
            functools.partial(self._planned, instance, samples, claims, remote, estimate), key=(instance.name, estimate)
        )
        if plan.hub is not None:  # no command until its files are downloaded
            return plan
        spec = instance.backend.launch_spec(instance.settings, self.port_for(instance), self._planner.placement(plan))
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
            reader = hub_reader(self._settings.hub, self._hub_headers_dir)
            return plan_from_hub(self._planner, reader, instance.name, settings, samples, claims, remote)
        found = planned_model(instance.backend, settings, instance.name)  # an Ollama model to pull: its size
        measured = self._measured(instance, found if isinstance(found, Path) else None, estimate)
        settings = with_local_projector(settings)
        return self._planner.plan(instance.name, settings, found, samples, claims, remote, measured=measured)

    async def in_planning_thread(self, work: Callable[[], T]) -> T:
        """``work`` (planning) in one of the planning threads, within their bound: the router's plans for
        an on-demand start wait their turn as a start's and `GET /plan`'s do."""
        return await self._planning.run(work)

    def planner_with_stopped(self, instance: Instance) -> Callable[[Collection[str]], Plan]:
        """A function of instance names: the plan for ``instance`` were those stopped, against the GPUs and
        claims as they are now (read here, on the loop; the function may run in a worker thread)."""
        samples, remote = self._sampler.latest(), self._remote(instance)
        held = {i.name: i.placement.claims_mib for i in self._others(instance)}
        peers_mib = self._lending.claimed_mib(())  # the peers' claims alone

        def plan_without(stopped: Collection[str]) -> Plan:
            back = claims_total(mib for n, mib in held.items() if n in stopped)
            kept = claims_total([*(mib for n, mib in held.items() if n not in stopped), peers_mib])
            return self._planned(instance, list(freed(samples, back)), dict(kept), remote)

        return plan_without
