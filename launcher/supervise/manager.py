"""All instances of a configuration: lookup, ports, start/stop/restart, and shutdown of everything."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx

from launcher.backends import backend_for
from launcher.config import Settings
from launcher.errors import LauncherError
from launcher.supervise.instance import Event, Instance, InstanceStatus, State
from launcher.supervise.ports import pick_free_port


class Manager:
    """The only way in to the processes: the API and the CLI act through it."""

    def __init__(self, settings: Settings, *, on_event: Callable[[Event], None] = lambda _e: None) -> None:
        self.settings = settings
        self.log_dir = settings.daemon.state_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._http = httpx.AsyncClient()
        self.instances: dict[str, Instance] = {
            name: Instance(
                name,
                model,
                backend=backend_for(model),
                log_dir=self.log_dir,
                http=self._http,
                on_event=on_event,
            )
            for name, model in settings.models.items()
        }

    def get(self, name: str) -> Instance:
        self.settings.model(name)  # raises UnknownInstanceError naming the configured models
        return self.instances[name]

    def _assign_port(self, instance: Instance) -> None:
        if instance.port is None:
            first, last = self.settings.daemon.instance_ports
            taken = [i.port for i in self.instances.values() if i.port is not None]
            taken.append(self.settings.daemon.port)
            instance.port = pick_free_port(first, last, taken)

    async def start(self, name: str) -> InstanceStatus:
        instance = self.get(name)
        self._assign_port(instance)
        await instance.start()
        return instance.status()

    async def stop(self, name: str) -> InstanceStatus:
        instance = self.get(name)
        await instance.stop()
        return instance.status()

    async def restart(self, name: str) -> InstanceStatus:
        instance = self.get(name)
        self._assign_port(instance)
        await instance.restart()
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

    def statuses(self) -> list[InstanceStatus]:
        return [instance.status() for instance in self.instances.values()]

    async def shutdown(self) -> None:
        """Stop every server (TERM, wait, KILL, concurrently) and close the HTTP client."""
        await asyncio.gather(*(i.stop() for i in self.instances.values() if i.active))
        await self._http.aclose()
