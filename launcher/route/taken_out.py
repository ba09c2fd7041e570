"""Replicas the front door took out after a request to them failed, each with the probe that puts it back
once its health check answers again."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Mapping

import httpx

from launcher.schema_instances import State
from launcher.supervise.manager import Manager
from launcher.supervise.table import InstanceView

_PROBE_S = (0.1, 2.0)  # a failed replica is probed from every 100 ms up to every 2 s until it answers


class TakenOut:
    """``manager``: where the taking out is noted, in the instance's history; ``back``: called with an
    instance its probe put back, so that its model's queue moves."""

    def __init__(
        self,
        instances: Mapping[str, InstanceView],
        http: httpx.AsyncClient,
        *,
        manager: Manager,
        back: Callable[[str], None],
    ) -> None:
        self._instances = instances
        self._http = http
        self._manager = manager
        self._back = back
        self._probes: dict[str, asyncio.Task[None]] = {}  # instance -> the probe that puts it back

    def __contains__(self, instance: str) -> bool:
        return instance in self._probes

    def take_out(self, instance: str, reason: str) -> None:
        """Take a replica that failed a request out until it answers its health check again."""
        if instance in self._probes:
            return
        self._manager.note(instance, "warning", f"taken out of the front door: {reason}")
        self._probes[instance] = asyncio.create_task(self._probe(instance))

    def put_back(self, instance: str) -> None:
        probe = self._probes.pop(instance, None)
        if probe is not None and probe is not asyncio.current_task():
            probe.cancel()

    def keep_only(self, instances: Collection[str]) -> None:
        """Drop the probes of instances a reload removed."""
        for instance in [i for i in self._probes if i not in instances]:
            self._probes.pop(instance).cancel()

    def cancel(self) -> list[asyncio.Task[None]]:
        """Cancel every probe (the router closes); the tasks, to be awaited."""
        probes = list(self._probes.values())
        for probe in probes:
            probe.cancel()
        return probes

    async def _probe(self, instance: str) -> None:
        it = self._instances[instance]
        delay_s = _PROBE_S[0]
        while True:
            await asyncio.sleep(delay_s)
            serving = it.state == State.READY and it.port is not None
            if serving and await it.backend.is_ready(self._http, it.port or 0, it.settings.health.timeout):
                break
            delay_s = min(delay_s * 2, _PROBE_S[1])
        self.put_back(instance)
        self._back(instance)
