"""The daemon's parts, wired in one place: the state directory's lock, the leftover cleanup, the child
registry, the event bus, the instance table, the peers' claims on this host, the GPU sampler, the log
directory, what this host lends, the HTTP client, the planner, the peers, the manager, the front door's
router and the reader of the servers' own metrics; and the API's listening socket.

Each part is given what it needs when it is made (`supervision` makes them in that order, each from those
before it); none is changed afterwards. What several parts share about the instances is the instance table
(supervise/table.py), made empty first: the manager fills it, the router writes its requests in it, the
API, the router, the peers and the simulated GPUs read it. The manager hears of news by subscribing, in
the wiring's sight: to every GPU sample and to every read of the peers.

Only this module makes them, and only after the state directory's lock is held: a command that only
reads (`plan`, `gpus`, `status`, `doctor`) never gets here, so it can never stop, start or record a
process.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import httpx
from starlette.types import ASGIApp

from launcher.address import is_loopback
from launcher.api.limits import BodyBudget, BodyLimits
from launcher.api.origin import BrowserGuard, HostNames
from launcher.config import Settings
from launcher.config_file import read_token
from launcher.errors import ConfigError, StartError
from launcher.events import Bus
from launcher.gpu.sampler import Sampler, open_sampler
from launcher.plan.planner import Planner
from launcher.route.front import FrontDoor
from launcher.route.proxy import Upstream
from launcher.route.router import Router
from launcher.rpc.claims import ClaimBook
from launcher.rpc.peers import Peers
from launcher.schema_instances import Event
from launcher.statedir.owner import StateDirLock
from launcher.supervise import handover
from launcher.supervise.leftovers import ChildRegistry
from launcher.supervise.lending import Lending, held_mib
from launcher.supervise.manager import Manager
from launcher.supervise.ports import port_holder
from launcher.supervise.server_metrics import ServerMetrics
from launcher.supervise.table import InstanceTable

# The events kept for `GET /events?recent=`, and how far a reader of the stream may fall behind.
_EVENTS_KEPT = 500


def api_token(settings: Settings) -> str | None:
    """The API token, or the reason the daemon must not listen (checked before anything else happens)."""
    token = read_token(settings.daemon.token_file)
    if token is None and not is_loopback(settings.daemon.host):
        raise ConfigError(
            f"refusing to listen on {settings.daemon.host} without an API token",
            hint="set daemon.token_file, or daemon.host: 127.0.0.1",
        )
    return token


def listen(settings: Settings) -> socket.socket:
    """The API's listening socket. TCP_NODELAY: without it every answer on a kept-alive connection waits
    for the client's delayed ACK (Nagle), about 40 ms; asyncio sets it only on sockets made with
    IPPROTO_TCP, and accepted sockets inherit both from this one."""
    host, port = settings.daemon.host, settings.daemon.port
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        holder = port_holder(port)
        raise StartError(
            f"the daemon cannot listen on {host}:{port}: {exc.strerror}" + (f" (held by {holder})" if holder else ""),
            hint="is a launcher daemon already running? `launcher status` asks it; or set daemon.port",
        ) from None
    sock.listen(128)
    return sock


def router_keys(settings: Settings, token: str | None) -> frozenset[str] | None:
    """The keys /v1 and /upstream take: router.api_keys and the API token; None (open) on a loopback bind
    without router keys. A public bind always has the token at least (api_token refuses one without)."""
    keys = frozenset(settings.router.api_keys)
    if not keys and is_loopback(settings.daemon.host):
        return None
    return keys | ({token} if token is not None else set())


def front_door(door: FrontDoor, settings: Settings) -> ASGIApp:
    """What listens on the daemon's port: the Host and cross-site checks before everything (/health too:
    the probes of Docker and Kubernetes name the daemon by an address, which passes), then the limits on
    request bodies, then ``door``, the front door (/v1, /upstream) before the REST API."""
    budget = BodyBudget(settings.daemon.body_budget_mib * 2**20)
    limited = BodyLimits(door, budget)
    return BrowserGuard(limited, HostNames.of(settings.daemon), frozenset(settings.daemon.cors_origins))


@dataclass(frozen=True)
class Wired:
    """The parts the API and the daemon are given."""

    manager: Manager
    router: Router
    table: InstanceTable
    events: Bus[Event]
    sampler: Sampler
    peers: Peers | None
    lending: Lending
    gpu_backend: str  # which GPU backend and why
    server_metrics: ServerMetrics
    state_lock: StateDirLock  # the state directory's: an upgrade hands it to the program executed again
    # Of an upgrade (supervise/handover.py): the listening socket the old program handed over, and the
    # instances it ran whose server was not taken over, to start again.
    listening: socket.socket | None = None
    start_again: tuple[str, ...] = ()


@asynccontextmanager
async def supervision(settings: Settings, on_event: Callable[[Event], None]) -> AsyncIterator[Wired]:
    """Own the state directory, stop what an earlier daemon left running, watch the GPUs (one reading of
    each before this yields) and supervise; on the way out stop every server, then let go of it all."""
    lock = StateDirLock.claim(settings.daemon.state_dir, settings.daemon.client_url)
    listening = handover.inherited_socket(settings.daemon.host, settings.daemon.port)
    try:
        handed = handover.take(lock.state_dir, os.getpid())
        registry = ChildRegistry(lock)
        kept = [s for s in handed.servers if handover.still_ours(s) is None] if handed is not None else []
        for server in handed.servers if handed is not None else []:
            if server not in kept:
                handover.reap(server.pid)
        leftovers = registry.clean_leftovers(keep={s.pid for s in kept})
        events = Bus[Event](_EVENTS_KEPT, keep=_EVENTS_KEPT, listener=on_event)
        for leftover in leftovers:
            events.publish(Event.now("error", f"stopped a server an earlier daemon left running: {leftover}"))
        # After an upgrade's exec, its record usable or not: the servers it did not record are this process's.
        upgraded = handed is not None or lock.handed_over
        for stray in handover.stop_unrecorded({s.pid for s in kept}) if upgraded else []:
            events.publish(Event.now("upgrade", f"stopped a server the old program had not recorded yet: {stray}"))
        table = InstanceTable()
        claims = ClaimBook(
            on_expired=lambda r: events.publish(Event.now("peer", f"the claim of {r.holder} on {r.endpoint} lapsed"))
        )
        # Simulated GPUs show as used what our servers and the peers' claims hold.
        sampler, gpu_backend = open_sampler(settings, partial(held_mib, table.instances, claims))
        lock.state_dir.logs_dir.mkdir(parents=True, exist_ok=True)
        lending = Lending(table.instances, sampler, settings.gpus, claims)
        async with httpx.AsyncClient() as http:
            planner = Planner(settings.gpus, sampler.identities, sampler.links)
            # Made without peers too: a reload may add some (and an empty list reads nothing).
            peers = Peers(settings, events=events, active=table.active_names)
            manager = Manager(
                settings,
                table=table,
                events=events,
                sampler=sampler,
                registry=registry,
                planner=planner,
                http=http,
                state_dir=lock.state_dir,
                lending=lending,
                peers=peers,
            )
            sampler.subscribe(manager.observe)
            peers.subscribe(manager.after_peers_read)
            await sampler.start()
            try:
                await peers.start()
                router = Router(
                    settings, manager=manager, table=table, events=events, peers=peers, http=http, upstream=Upstream()
                )
                # The servers' own series, read on the sampler's poll interval for /metrics.
                server_metrics = ServerMetrics(table.instances, http, lambda: sampler.poll_interval_s)
                server_metrics.start()
                try:
                    async with router:
                        start_again = []
                        if handed is not None:  # those not ours any more: the cleanup above stopped them
                            lost = [s.instance for s in handed.servers if s not in kept]
                            start_again = [*handed.starting, *lost, *await manager.adopt(kept)]
                        yield Wired(
                            manager,
                            router,
                            table,
                            events,
                            sampler,
                            peers,
                            lending,
                            gpu_backend,
                            server_metrics,
                            lock,
                            listening,
                            tuple(start_again),
                        )
                finally:
                    await server_metrics.stop()
            finally:
                await manager.stop_all()
                await peers.stop()  # after the servers: their claims are released last
                await sampler.stop()
    finally:
        if listening is not None:
            listening.close()
        lock.release()
