"""The daemon's side of an upgrade's bridge (launcher/bridge.py): the old program starts it before it stops
accepting and names it to the new program ($LAUNCHER_BRIDGE_PID, bound to the pid as the descriptors
are); the new program, once it serves, tells it to stop and reaps it. A bridge that does not start in time
is killed, and the upgrade goes on without it (the API is then unanswered while the new program starts).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable

import httpx
import psutil
from starlette.types import ASGIApp

from launcher.api.origin import HostNames
from launcher.bridge import READY, BridgeSpec
from launcher.config import Settings
from launcher.config_model import ModelSettings
from launcher.schema_instances import State
from launcher.statedir.owner import handed_fds
from launcher.supervise.instance import Instance
from launcher.supervise.process import pdeathsig_prefix

log = logging.getLogger("launcher")

BRIDGE_ENV = "LAUNCHER_BRIDGE_PID"
_STARTS_WITHIN_S = 30.0  # its imports (0.5 s of CPU), on a loaded host; the old program serves meanwhile
_POLL_S = 0.05
# The new program's start, once the drain is over: its imports, the adoption of each server (a /health each),
# on a loaded host. Past it the bridge ends (bridge.py's `lifetime_s`).
_TAKEN_OVER_WITHIN_S = 120.0
_STOP_MARGIN_S = 5.0  # past its requests' drain: its connections' end (bridge.py's _ASKED_WITHIN_S)


def longest_drain_s(models: Iterable[ModelSettings]) -> float:
    """The models' longest drain_timeout_s: what the front door's requests in flight may take to finish."""
    return max((m.drain_timeout_s for m in models), default=0.0)


def spec(
    settings: Settings,
    listen_fd: int,
    keys: frozenset[str] | None,
    instances: Iterable[Instance],
    health: httpx.Response,
) -> BridgeSpec:
    """What the bridge is told: the daemon's Host and Origin rules and front door keys, the serving servers'
    ports by every name the front door answers to (instance, model, aliases), and the health now."""
    routes: dict[str, list[int]] = {}
    for instance in instances:
        if instance.state != State.READY or instance.port is None:
            continue
        for name in dict.fromkeys([instance.name, instance.group, *instance.settings.aliases]):
            routes.setdefault(name, []).append(instance.port)
    drain_s = longest_drain_s(settings.models.values())
    return BridgeSpec(
        listen_fd=listen_fd,
        hosts=HostNames.of(settings.daemon),
        cors_origins=list(settings.daemon.cors_origins),
        keys=None if keys is None else sorted(keys),
        routes=routes,
        health=health.text,
        health_status=health.status_code,
        drain_s=drain_s,
        lifetime_s=drain_s + _TAKEN_OVER_WITHIN_S,
    )


def _spawn(bridge_spec: BridgeSpec) -> subprocess.Popen[bytes]:
    """Fork it from the calling thread, the main one: its parent-death signal is tied to that thread."""
    argv = [*pdeathsig_prefix(), sys.executable, "-m", "launcher.bridge"]
    bridge = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(bridge_spec.listen_fd,))
    assert bridge.stdin is not None
    with bridge.stdin:
        bridge.stdin.write(bridge_spec.model_dump_json().encode())
    return bridge


async def start(
    settings: Settings, sock: socket.socket, keys: frozenset[str] | None, instances: Iterable[Instance], api: ASGIApp
) -> subprocess.Popen[bytes] | None:
    """The bridge, serving on ``sock`` (see `spec`; ``api`` says its health); None when it did not start
    (logged)."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://daemon") as client:
        health = await client.get("/health")
    try:
        bridge = _spawn(spec(settings, sock.fileno(), keys, instances, health))
    except OSError as exc:
        log.warning("upgrade: the bridge did not start (%s): the API waits for the new program", exc)
        return None
    assert bridge.stdout is not None
    try:
        line = await asyncio.wait_for(asyncio.to_thread(bridge.stdout.readline), _STARTS_WITHIN_S)
    except TimeoutError:
        line = b""
    except BaseException:  # cancelled (the daemon stops): nobody would end it, and it would accept meanwhile
        kill(bridge)
        raise
    if line == READY:  # the caller stops accepting at once (no await between)
        log.info("upgrade: the bridge (pid %d) answers until the new program serves", bridge.pid)
        return bridge
    log.warning("upgrade: the bridge did not start: the API waits for the new program")
    kill(bridge)
    return None


def kill(bridge: subprocess.Popen[bytes]) -> None:
    """Kill and reap ``bridge`` now (its readline in `start`, if still waiting, ends with it)."""
    bridge.kill()
    bridge.wait()


def handed() -> int | None:
    """The pid of the bridge the previous program of this process started, taken out of the environment."""
    pids = handed_fds(BRIDGE_ENV)
    return pids[0] if pids else None


async def end(pid: int, settings: Settings) -> None:
    """Tell the bridge ``pid`` to stop (it finishes its requests in flight) and reap it; killed after the
    models' longest drain and a margin. A pid that is not our bridge is left alone."""
    stop_within_s = longest_drain_s(settings.models.values()) + _STOP_MARGIN_S
    try:
        process = psutil.Process(pid)
        ours = process.ppid() == os.getpid() and "launcher.bridge" in process.cmdline()
    except psutil.Error:
        ours = False
    if not ours:
        _reaped(pid)  # it ended already
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + stop_within_s
    while not _reaped(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(_POLL_S)


def _reaped(pid: int) -> bool:
    """Whether child ``pid`` has ended (reaped now, or by someone else), without waiting."""
    try:
        return os.waitpid(pid, os.WNOHANG) != (0, 0)
    except ChildProcessError:
        return True
