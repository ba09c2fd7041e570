"""Taking over the servers an upgrade handed over (supervise/handover.py), instead of starting them.

Each server is adopted only when it is still the process the old program ran (same pid and start time,
this daemon's child, that instance's, running the command it was handed over with, listening on the port
the record names: another process there would get the model's requests), when its model's
settings as read now are the ones it was started with (a configuration edited before the upgrade is not
silently kept), and when it answers its health check. Its command is not compared with the one this
program would build: a new version that adds a flag would otherwise restart every model; the server keeps
its command until its next start. It then goes to ready with its log, plan and claims, and no
new process. One that does not check out is killed and its instance started normally: the hand-over
never leaves a process nobody supervises.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence

import psutil

from launcher.config_model import ModelSettings
from launcher.errors import LauncherError
from launcher.plan.placement import Placement
from launcher.schema_instances import Event
from launcher.schema_plans import Plan
from launcher.supervise.handover import HandedServer, reap, still_ours
from launcher.supervise.instance import Instance
from launcher.supervise.parts import DaemonParts
from launcher.supervise.process import ServerProcess


async def adopt_all(
    servers: Sequence[HandedServer],
    instances: Mapping[str, Instance],
    placement_of: Callable[[Plan], Placement],
    parts: DaemonParts,
    claim: Callable[[str, Plan], Awaitable[None]] | None,
) -> list[str]:
    """Adopt each of ``servers`` into its instance; the names of those that were not (their server, if it
    was still ours, killed), to be started again. ``claim``: the peers' (None without peers), asked again
    for what an adopted server's plan holds on their rpc-servers (the old program's claims lapse with it)."""
    outcomes = await asyncio.gather(*(_adopt(s, instances.get(s.instance), placement_of, parts) for s in servers))
    for server, adopted in zip(servers, outcomes, strict=True):
        if adopted and claim is not None and server.plan is not None and placement_of(server.plan).rpc:
            try:
                await claim(server.instance, server.plan)
            except LauncherError as exc:  # it runs on regardless: what the peer lends may now go to another
                note = f"the peers did not take this server's claim again: {exc.message}"
                parts.on_event(Event.now("upgrade", note, instance=server.instance))
    return [server.instance for server, adopted in zip(servers, outcomes, strict=True) if not adopted]


async def _adopt(
    server: HandedServer, instance: Instance | None, placement_of: Callable[[Plan], Placement], parts: DaemonParts
) -> bool:
    why = gone = still_ours(server)
    if why is None:
        try:
            why = await _take(server, instance, placement_of, parts)
        except Exception as exc:  # a plan naming a GPU that is gone, no pidfd (before Linux 5.3), a bug
            why = f"{type(exc).__name__}: {exc}"
    if why is None:
        return True
    if gone is None:
        await _kill(server.pid)
    else:
        reap(server.pid)
    with contextlib.suppress(OSError):  # a full disk: counted at the next write
        parts.registry.remove(server.pid)
    parts.on_event(
        Event.now("upgrade", f"the server (pid {server.pid}) was not taken over: {why}", instance=server.instance)
    )
    return False


async def _take(
    server: HandedServer, instance: Instance | None, placement_of: Callable[[Plan], Placement], parts: DaemonParts
) -> str | None:
    """Adopt a live server of ours into ``instance``, or say why not."""
    if instance is None:
        return "its model is no longer configured"
    placement = Placement() if server.plan is None else placement_of(server.plan)
    if not same_settings(server.settings_json, instance.settings):
        return "its model's settings changed since it started"
    argv = server.argv
    # The process runs its arguments; its program may differ (a wrapper script exec'd the real one).
    process = psutil.Process(server.pid)
    running = process.cmdline()
    if running[len(running) - len(argv) + 1 :] != argv[1:]:
        return "the process does not run the command it was handed over with"
    # The front door will send the model's requests to that port: whoever answers there must be this server
    # (or a process of its own: a wrapper script that did not exec the real one).
    if server.port not in _listening_ports([process, *process.children(recursive=True)]):
        return f"it does not listen on port {server.port}"
    if not await instance.backend.is_ready(parts.http, server.port, instance.settings.health.timeout):
        return "it does not answer its health check"
    await instance.adopt(ServerProcess.adopt(server.pid), server.port, placement, server.plan, argv)
    return None


def _listening_ports(processes: Sequence[psutil.Process]) -> set[int]:
    ports = set()
    for process in processes:
        with contextlib.suppress(psutil.Error):  # a process of its that ended meanwhile
            ports |= {c.laddr.port for c in process.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    return ports


def same_settings(recorded_json: str, settings: ModelSettings) -> bool:
    """Whether the settings a server was started with (the old program's JSON of them) are ``settings``: every
    key the old program knew has the same value now; a key new in this version is taken as its old default
    (the old program could not have set it), a key this version dropped as a change."""
    try:
        recorded = json.loads(recorded_json)
    except ValueError:
        return False
    now = json.loads(settings.model_dump_json())
    return isinstance(recorded, dict) and set(recorded) <= set(now) and all(recorded[k] == now[k] for k in recorded)


async def _kill(pid: int) -> None:
    """SIGKILL to the server's group, and reap it (it is this process's child)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        await asyncio.to_thread(os.waitpid, pid, 0)
