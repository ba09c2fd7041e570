"""The daemon's parts, wired in one place: the state directory's lock, the leftover cleanup, the child
registry, the log directory, the GPU sampler (and the simulated GPUs' usage hook), the planner, the HTTP
client, the manager and the front door's router; and the API's listening socket.

Only this module makes them, and only after the state directory's lock is held: a command that only
reads (`plan`, `gpus`, `status`, `doctor`) never gets here, so it can never stop, start or record a
process.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
from starlette.types import ASGIApp

from launcher.address import is_loopback
from launcher.api.limits import BodyBudget, BodyLimits
from launcher.api.origin import BrowserGuard, HostNames
from launcher.config import Settings
from launcher.config_file import read_token
from launcher.errors import ConfigError, StartError
from launcher.gpu.sampler import open_sampler
from launcher.gpu.sim import SimBackend
from launcher.plan.planner import Planner
from launcher.route.front import FrontDoor
from launcher.route.proxy import Upstream
from launcher.route.router import Router
from launcher.rpc.peers import Peers
from launcher.schema import Event
from launcher.statedir.owner import StateDirLock
from launcher.supervise.leftovers import ChildRegistry
from launcher.supervise.manager import Manager
from launcher.supervise.ports import port_holder


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


def front_door(api: ASGIApp, router: Router, settings: Settings, token: str | None) -> ASGIApp:
    """What listens on the daemon's port: the Host and cross-site checks before everything (/health too:
    the probes of Docker and Kubernetes name the daemon by an address, which passes), then the limits on
    request bodies, then the front door (/v1, /upstream) before the REST API."""
    budget = BodyBudget(settings.daemon.body_budget_mib * 2**20)
    door = BodyLimits(FrontDoor(api, router, router_keys(settings, token)), budget)
    return BrowserGuard(door, HostNames.of(settings.daemon), frozenset(settings.daemon.cors_origins))


@dataclass(frozen=True)
class Wired:
    manager: Manager
    router: Router
    gpu_backend: str  # which GPU backend and why


@asynccontextmanager
async def supervision(settings: Settings, on_event: Callable[[Event], None]) -> AsyncIterator[Wired]:
    """Own the state directory, stop what an earlier daemon left running, watch the GPUs (one reading of
    each before this yields) and supervise; on the way out stop every server, then let go of it all."""
    lock = StateDirLock.claim(settings.daemon.state_dir, settings.daemon.client_url)
    try:
        registry = ChildRegistry(lock)
        leftovers = registry.clean_leftovers()
        sampler, gpu_backend = open_sampler(settings)
        lock.state_dir.logs_dir.mkdir(parents=True, exist_ok=True)
        async with httpx.AsyncClient() as http:
            planner = Planner(settings.gpus, sampler.identities, sampler.links)
            peers = Peers(settings) if settings.peers else None
            manager = Manager(
                settings,
                sampler=sampler,
                registry=registry,
                planner=planner,
                http=http,
                state_dir=lock.state_dir,
                on_event=on_event,
                peers=peers,
            )
            for leftover in leftovers:
                manager.publish(Event.now("error", f"stopped a server an earlier daemon left running: {leftover}"))
            if isinstance(sampler.backend, SimBackend):
                sampler.backend.usage = manager.claimed_mib  # simulated memory follows our instances
            sampler.subscribe(manager.observe)
            await sampler.start()
            try:
                if peers is not None:
                    await peers.start()
                async with Router(settings, manager, http, Upstream()) as router:
                    yield Wired(manager, router, gpu_backend)
            finally:
                await manager.stop_all()
                if peers is not None:
                    await peers.stop()  # after the servers: their claims are released last
                await sampler.stop()
    finally:
        lock.release()
