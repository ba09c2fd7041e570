"""This daemon's view of its peers (other launchers): each one's `GET /rpc` and the models its front door
serves (`GET /v1/models`), read every `rpc.peer_interval_s`, and the claims this daemon's instances hold
on their rpc-servers, renewed on the same beat, released when the instance stops.

A peer that does not answer is an event and a status (`GET /peers`), never an error of this daemon: its
endpoints are not planned onto until it answers again. (What happens to an instance already running on
a peer that went away is the manager's to decide, with launcher/rpc/failover.py: it subscribes to be told
after each read.)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from launcher.client import DaemonClient
from launcher.config import Settings
from launcher.config_file import read_token
from launcher.config_rpc import PeerSettings, RpcSettings
from launcher.errors import LauncherError, StartError
from launcher.events import Bus
from launcher.schema_front_door import ServedModel
from launcher.schema_instances import Event
from launcher.schema_plans import Plan
from launcher.schema_rpc import ClaimDevice, ClaimRequest, PeerStatus, RpcEndpoint, RpcReport

_READ_TIMEOUT_S = 5.0
T = TypeVar("T")


@dataclass
class _Seen:
    reachable: bool = False
    error: str | None = "not read yet"
    read_at: float | None = None  # monotonic, of the last answer
    endpoints: tuple[RpcEndpoint, ...] = ()
    models: tuple[ServedModel, ...] = ()
    token: str | None = None  # the peer's token as last read from its file


class Peers:
    """``events``: where news of the peers goes; ``active``: the instances that run here (only their claims
    are renewed)."""

    def __init__(self, settings: Settings, *, events: Bus[Event], active: Callable[[], Collection[str]]) -> None:
        self._me = settings.daemon.client_url
        self._interval_s = settings.rpc.peer_interval_s
        self._ttl_s = settings.rpc.claim_ttl_s
        self._peers = {peer.label: peer for peer in settings.peers}
        self._seen = {name: _Seen() for name in self._peers}
        self._held: dict[str, list[tuple[str, ClaimRequest]]] = {}  # instance -> (peer, claim) it holds
        # Instances whose claims are being taken: not running yet, and a renewal meanwhile must not take
        # them for a stopped instance's and release them (the instance runs as soon as they are taken).
        self._claiming: set[str] = set()
        # One claim operation at a time per instance: a peer releases by holder, so a release still on its
        # way must reach the peer before the same holder's next claim does, or it would release that one.
        self._serial: dict[str, asyncio.Lock] = {}
        self._task: asyncio.Task[None] | None = None
        self._events = events
        self._active = active
        self._listeners: list[Callable[[], None]] = []

    def reconfigure(self, rpc: RpcSettings, peers: Sequence[PeerSettings]) -> None:
        """A reload: read ``peers`` every ``rpc.peer_interval_s`` (after the read under way) and claim for
        ``rpc.claim_ttl_s`` from now on. An added peer (or one whose settings changed) is read at the next
        beat; a removed one is no longer read nor planned onto, and the claims held on it are dropped (it
        is not asked again: they lapse by their lease)."""
        self._interval_s, self._ttl_s = rpc.peer_interval_s, rpc.claim_ttl_s
        old = self._peers
        self._peers = {peer.label: peer for peer in peers}
        self._seen = {
            name: self._seen[name] if old.get(name) == peer else _Seen() for name, peer in self._peers.items()
        }
        for instance, held in list(self._held.items()):
            kept = [(peer, request) for peer, request in held if peer in self._peers]
            for peer, request in held:
                if peer not in self._peers:
                    message = (
                        f"peer {peer} was removed from the configuration: its claim on {request.endpoint} is dropped"
                    )
                    self._events.publish(Event.now("peer", message, instance=instance))
            self._held[instance] = kept

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after each read of every peer (the manager judges the instances that use their
        endpoints), before the claims are renewed."""
        self._listeners.append(listener)

    def holder(self, instance: str) -> str:
        """How a peer knows this daemon's ``instance``: the daemon's URL and the instance."""
        return f"{self._me}#{instance}"

    def statuses(self) -> list[PeerStatus]:
        now = time.monotonic()
        return [
            PeerStatus(
                name=name,
                url=self._peers[name].url,
                reachable=seen.reachable,
                error=seen.error,
                read_s_ago=None if seen.read_at is None else round(now - seen.read_at, 3),
                endpoints=list(seen.endpoints),
                models=list(seen.models),
            )
            for name, seen in self._seen.items()
        ]

    def front_door(self, name: str) -> tuple[str, str | None] | None:
        """Peer ``name``'s URL and the token its front door takes: as of the last read (a rotated token is
        picked up on the next beat; no file is read on a request's path). None: a reload removed it."""
        peer = self._peers.get(name)
        return None if peer is None else (peer.url, self._seen[name].token)

    # ---- reading ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Read every peer once (so that the first plans see them), then on every beat."""
        await self._read_all()
        self._task = asyncio.create_task(self._beat())

    async def stop(self) -> None:
        """Stop reading, and release every claim still held."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.gather(*(self.release(instance) for instance in list(self._held)))

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self._read_all()
            for listener in self._listeners:
                listener()
            await self._renew()

    async def _read_all(self) -> None:
        await asyncio.gather(*(self._read(name) for name in self._peers))

    async def _read(self, name: str) -> None:
        seen, peer = self._seen[name], self._peers[name]
        try:
            report, models = await asyncio.to_thread(self._ask, name, _rpc_and_models)
            token = read_token(peer.token_file)
        except LauncherError as exc:
            if seen.reachable or seen.error == "not read yet":  # news: down, or down from the start
                self._events.publish(Event.now("peer", f"peer {name} is not reachable: {exc.message}"))
            seen.reachable, seen.error = False, exc.message
            return
        if not seen.reachable and seen.read_at is not None:
            self._events.publish(Event.now("peer", f"peer {name} is reachable again"))
        seen.reachable, seen.error, seen.read_at, seen.endpoints = True, None, time.monotonic(), tuple(report.endpoints)
        # Only what the peer serves itself: a peer's peers are its business, and a model listed back and
        # forth between two launchers would send its requests round in a loop.
        seen.models, seen.token = tuple(m for m in models if m.peer is None), token

    def _ask(self, name: str, question: Callable[..., T], *args: Any) -> T:
        """One exchange with peer ``name`` on a connection of its own (in a worker thread)."""
        peer = self._peers.get(name)
        if peer is None:  # a reload removed it while this exchange waited for its turn
            raise LauncherError(f"peer {name} is no longer configured")
        client = DaemonClient(peer.url, token=read_token(peer.token_file), timeout_s=_READ_TIMEOUT_S)
        try:
            return question(client, *args)
        finally:
            client.close()

    # ---- claims -------------------------------------------------------------------------------------------

    async def claim(self, instance: str, plan: Plan) -> None:
        """Register with each peer what ``plan`` puts on its devices (one claim per endpoint), or release
        what was taken and raise StartError naming the peer that refused."""
        self._claiming.add(instance)
        try:
            async with self._one_at_a_time(instance):
                await self._claim(instance, plan)
        finally:
            self._claiming.discard(instance)

    def _one_at_a_time(self, instance: str) -> asyncio.Lock:
        return self._serial.setdefault(instance, asyncio.Lock())

    async def _claim(self, instance: str, plan: Plan) -> None:
        await self._release(instance)  # a new plan replaces the last one's claims
        wanted: dict[tuple[str, str], list[ClaimDevice]] = {}
        for device in plan.devices:
            if device.endpoint is not None:
                wanted.setdefault((device.host, device.endpoint), []).append(
                    ClaimDevice(gpu=device.gpu, memory_mib=device.total_mib)
                )
        held = self._held.setdefault(instance, [])
        for (peer, endpoint), devices in wanted.items():
            request = ClaimRequest(holder=self.holder(instance), endpoint=endpoint, devices=devices, ttl_s=self._ttl_s)
            try:
                await asyncio.to_thread(self._ask, peer, DaemonClient.claim, request)
            except LauncherError as exc:
                await self._release(instance)
                raise StartError(f"peer {peer} refused the claim on {endpoint}: {exc.message}", hint=exc.hint) from None
            held.append((peer, request))

    async def release(self, instance: str) -> None:
        """Release ``instance``'s claims; a peer that cannot be told lets the lease run out (an event)."""
        async with self._one_at_a_time(instance):
            await self._release(instance)

    async def _release(self, instance: str) -> None:
        for peer, request in self._held.pop(instance, []):
            try:
                await asyncio.to_thread(self._ask, peer, DaemonClient.release, request.holder)
            except LauncherError as exc:
                message = f"could not release the claim on {request.endpoint} ({exc.message}): it lapses by its lease"
                self._events.publish(Event.now("peer", f"peer {peer}: {message}", instance=instance))

    async def _renew(self) -> None:
        """Renew the claims of the instances that run (or are taking theirs), release the others'. Each
        instance is judged as its turn comes, not from a list taken before the first release: a release
        waits on the network, and an instance may start meanwhile."""
        for instance in list(self._held):
            async with self._one_at_a_time(instance):
                if instance not in self._held:  # released meanwhile
                    continue
                if instance in self._claiming or instance in self._active():
                    await self._renew_claims(instance)
                else:
                    await self._release(instance)

    async def _renew_claims(self, instance: str) -> None:
        for peer, request in self._held[instance]:
            try:
                await asyncio.to_thread(self._ask, peer, DaemonClient.claim, request)
            except LauncherError as exc:
                message = f"peer {peer}: renewing the claim on {request.endpoint} failed: {exc.message}"
                self._events.publish(Event.now("peer", message, instance=instance))


def _rpc_and_models(client: DaemonClient) -> tuple[RpcReport, list[ServedModel]]:
    return client.rpc(), client.models()
