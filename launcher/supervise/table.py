"""The instances of the configuration, as the daemon's parts share them: made empty first by the wiring and
handed to each part that shares it (uvicorn's ServerState is the model). The manager fills it with the
instances it owns and acts on; the front door writes the requests it has in flight and queued on each;
the statuses, the API, the peers' claim renewal and the simulated GPUs read it.

Readers outside supervision see an instance through `InstanceView`, read-only: every act (start, stop,
a note in its history) goes through the manager.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from launcher.backends import ServerBackend
from launcher.config_model import ModelSettings
from launcher.schema_instances import Download, State
from launcher.supervise.instance import Instance


class InstanceView(Protocol):
    """What the front door and the API read of an instance."""

    @property
    def name(self) -> str: ...
    @property
    def group(self) -> str: ...  # the configured model it is (a replica NAME@N's is NAME)
    @property
    def settings(self) -> ModelSettings: ...
    @property
    def backend(self) -> ServerBackend: ...  # its server's model name, readiness and slots
    @property
    def state(self) -> State: ...
    @property
    def port(self) -> int | None: ...
    @property
    def active(self) -> bool: ...
    @property
    def restarting(self) -> bool: ...
    @property
    def downloading(self) -> bool: ...  # its hub files are being fetched before its start
    @property
    def download(self) -> Download | None: ...  # how far that is
    @property
    def degraded_reason(self) -> str | None: ...
    @property
    def last_error(self) -> str | None: ...
    @property
    def server_words(self) -> Collection[str]: ...  # what its server said as its runs ended (redact.py)


@dataclass
class RequestLoad:
    """The front door's requests, written by it (route/admission.py) and read by the statuses and by an
    instance that drains (supervise/drain.py's `InFlight`)."""

    in_flight: dict[str, int] = field(default_factory=dict)  # instance -> requests its server serves now
    queued: dict[str, int] = field(default_factory=dict)  # configured model -> requests waiting for one
    _released: asyncio.Event = field(default_factory=asyncio.Event, compare=False, repr=False)

    def take(self, instance: str) -> None:
        self.in_flight[instance] = self.in_flight.get(instance, 0) + 1

    def release(self, instance: str) -> None:
        left = self.in_flight.pop(instance, 0) - 1
        if left > 0:  # none: no entry kept, for an instance a reload may remove for good
            self.in_flight[instance] = left
        self._released.set()  # wakes every drain; each looks at its own count again

    def on(self, instance: str) -> int:
        return self.in_flight.get(instance, 0)

    async def finished(self, instance: str, timeout_s: float) -> int:
        """Wait until no request is in flight on ``instance``, ``timeout_s`` at most; the requests left."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self.on(instance):
                    self._released.clear()  # no await since the count was read: no release is missed
                    await self._released.wait()
        return self.on(instance)


@dataclass
class InstanceTable:
    instances: dict[str, Instance] = field(default_factory=dict)  # name -> instance, in configured order
    groups: dict[str, list[str]] = field(default_factory=dict)  # configured model -> its instances
    requests: RequestLoad = field(default_factory=RequestLoad)

    def add(self, instance: Instance) -> None:
        """Put ``instance`` in the table (the manager, as it makes them)."""
        self.instances[instance.name] = instance
        self.groups.setdefault(instance.group, []).append(instance.name)

    def ungroup(self, name: str) -> None:
        """Take instance ``name`` out of its model (a reload removed it): the front door no longer sees it
        while the manager stops it."""
        group = self.instances[name].group
        members = [n for n in self.groups.get(group, []) if n != name]
        if members:
            self.groups[group] = members
        else:
            self.groups.pop(group, None)

    def remove(self, name: str) -> None:
        """Forget instance ``name`` (stopped, after `ungroup`)."""
        del self.instances[name]

    @property
    def view(self) -> Mapping[str, InstanceView]:
        """The instances, read-only, for the parts outside supervision."""
        return self.instances

    def requests_on(self, name: str) -> tuple[int, int]:
        """(the front door's requests in flight on instance ``name``, those queued for its model)."""
        group = self.instances[name].group
        return self.requests.in_flight.get(name, 0), self.requests.queued.get(group, 0)

    def active_names(self) -> list[str]:
        """The instances whose supervision runs (from starting to backoff)."""
        return [name for name, instance in self.instances.items() if instance.active]

    def on_gpu(self, index: int) -> list[str]:
        """The active instances placed on GPU ``index``."""
        return [name for name, i in self.instances.items() if i.active and index in i.placement.gpus]
