"""What the router keeps of each configured model, shared by the router (serving) and the on-demand loader
(starts, swaps, idle stops), and the two readings of its instances both take: whether something of it runs
or is on its way, and the answer while its files download."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

from launcher.config_model import ModelSettings
from launcher.route.errors import RouteError
from launcher.schema_instances import State
from launcher.supervise.table import InstanceView

NO_ROOM_RETRY_S = 10  # Retry-After when the GPUs have no room: a model may go idle by then
_DOWNLOAD_RETRY_MAX_S = 60  # Retry-After while a model downloads: the time left, at most this


@dataclass
class RoutedModel:
    """What the router keeps of one configured model."""

    settings: ModelSettings
    instances: list[str]
    last_used_s: float = 0.0  # monotonic: its last request's end, or when it last became ready
    bringing_up: asyncio.Task[None] | None = None
    resident_until_s: float = 0.0  # monotonic: started on demand, not evicted before this (min_resident_s)
    awaiting_room_s: float | None = None  # monotonic: since when its requests wait for others to go idle
    drains: tuple[str, ...] = ()  # the busy models its wait needs idle (choose.Room.drain)


def active(routed: RoutedModel, instances: Mapping[str, InstanceView]) -> bool:
    """Something of the model runs or is on its way (a start, a restart, a restart's backoff)."""
    return routed.bringing_up is not None or any(
        instances[i].active or instances[i].restarting or instances[i].downloading for i in routed.instances
    )


def downloading(model: str, routed: RoutedModel, instances: Mapping[str, InstanceView]) -> RouteError | None:
    """The answer while the model's files download (a hub model's first start): 503, how far it is, and
    a Retry-After of the time left (bounded)."""
    for name in routed.instances:
        instance = instances[name]
        if instance.state == State.DOWNLOADING:
            download = instance.download
            said = download.describe() if download is not None else "starting"
            eta_s = download.eta_s if download is not None else None
            retry_s = NO_ROOM_RETRY_S if eta_s is None else max(1, min(int(eta_s) + 1, _DOWNLOAD_RETRY_MAX_S))
            return RouteError(503, f"{model} is downloading: {said}", "downloading", retry_after_s=retry_s)
    return None
