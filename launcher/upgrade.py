"""Upgrading the daemon without dropping its models (`launcher upgrade`, `POST /daemon/upgrade`, SIGUSR2): the
daemon re-executes the installed launcher program in the same process, and the new program takes over the
running servers (supervise/handover.py, supervise/adoption.py) instead of starting them.

Why the same process: every server is the daemon's child with a parent-death signal (SIGKILL, set by
setpriv: supervise/process.py) that fires when the *thread* that forked it ends. Servers are forked from
the main thread, which runs the event loop, and execve from that thread keeps it and the pid: the signal
does not fire, the new program is still the servers' parent (it reaps them), and a kill -9 of it still
takes them along. A second process could not become their parent: it would orphan them or kill them.

The daemon (daemon.py) first stops accepting connections, which then wait in the listening socket's backlog
(the daemon keeps a descriptor of it open), and lets the requests in flight through the front door finish
on the old program (`end_api`): then the API's open streams end cleanly, and its ordinary answers finish in
uvicorn's graceful shutdown. Then `reexec` writes the record and replaces the program; the new one serves
the same socket, so no connection is refused during the swap. It returns only when the exec failed: the
daemon then serves on as it was. An upgrade is refused (`refusal`) while something the exec would cut
part-way is under way: a reload, a restart, a roll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path

import psutil
import uvicorn

from launcher import upgrade_bridge
from launcher.api.stream_closer import StreamCloser
from launcher.bridge import until_asked
from launcher.errors import ConflictError, LauncherError
from launcher.reloading import read_like_serve
from launcher.route.front import FrontDoor
from launcher.schema_instances import State
from launcher.statedir.owner import StateDirLock, handing_fds
from launcher.supervise.handover import LISTEN_FD_ENV, HandedServer, HandOver, write
from launcher.supervise.instance import Instance
from launcher.systemd import Notifier
from launcher.upgrade_bridge import BRIDGE_ENV
from launcher.wiring import Wired, api_token

log = logging.getLogger("launcher")

# A server in these states serves and is handed over; one on its way (starting, loading, backoff) starts again.
_SERVING = frozenset({State.READY, State.UNHEALTHY})
# Their default action ends the process: ignored between the exec and the new program's handlers.
_IGNORED_MEANWHILE = (signal.SIGUSR2, signal.SIGHUP)
# A stop asked for during the hand-over interrupts it (`StopAsked`).
_STOPPING = (signal.SIGTERM, signal.SIGINT)
# Blocked from just before the exec until the new program's handlers are in place (`release_held_signals`):
# the mask and the signals pending under it outlive the exec, where a handler does not (until then a SIGTERM
# would end the new program without a drain, a SIGINT raise in its imports, a SIGHUP be lost).
HELD_ACROSS_EXEC = (*_STOPPING, *_IGNORED_MEANWHILE)
# The longest the API's end waits for the connections just accepted to send their request (a fixed 0.1 s was
# short at a load of 10 on 2 cores). The bridge answers meanwhile.
_ASKED_WITHIN_S = 5.0


def refusal(
    *,
    foreground: bool,
    serving: bool,
    stopping: bool,
    upgrading: bool,
    bridge_ending: bool,
    reloading: bool,
    restarting: Sequence[str],
) -> str | None:
    """Why the daemon cannot be upgraded now, from these facts, or None. A reload, restart or roll under way
    would be cut part-way by the exec (the new program does not carry it on): it is waited for."""
    if foreground:  # `launcher up`: its command line starts models, not a daemon
        return "it runs in the foreground (`launcher up`): stop it and run it again"
    if not serving:
        return "the daemon is still starting"
    if stopping:
        return "the daemon is stopping"
    if upgrading:
        return "an upgrade is already under way"
    if bridge_ending:  # the exec would leave it running, a child no program knows (a zombie once it ends)
        return "the last upgrade's bridge is still finishing its requests: ask again in a moment"
    if reloading:
        return "a reload of the configuration is under way: ask again once it is done"
    if restarting:
        return f"a restart of {', '.join(restarting)} is under way: ask again once it is done"
    return cannot_reexec()


def cannot_reexec() -> str | None:
    """Why this process cannot execute its program again, or None."""
    if not sys.orig_argv:
        return "the daemon does not know the command line it was started with"
    if not os.access(sys.executable, os.X_OK):
        return f"{sys.executable} is not an executable any more"
    return None


async def asked_by_signal(request_upgrade: Callable[[], Awaitable[object]]) -> None:
    """The upgrade SIGUSR2 asks for: a refusal is logged (nobody else hears it)."""
    try:
        await request_upgrade()
    except ConflictError as exc:
        log.warning("SIGUSR2 ignored: %s", exc.message)


def cannot_serve_again(source: Path | None) -> str | None:
    """Why the program executed again would not serve (it reads the configuration as `serve` does, and one
    that does not load would end it, and every server with it), or None. Reads files: run it in a thread."""
    try:
        api_token(read_like_serve(source))
    except LauncherError as exc:
        return f"the configuration does not load: {exc.message}"
    return None


async def end_api(server: uvicorn.Server, door: FrontDoor, streams: StreamCloser, drain_s: float) -> None:
    """End the API of an upgrade, which accepts nothing more: once the front door's requests in flight
    finished (``drain_s`` at most), its open streams end cleanly (they never end by themselves: waiting
    for them kept every new connection unanswered for the whole ``drain_s``) and uvicorn's graceful
    shutdown lets the ordinary answers under way finish (bounded by its timeout)."""
    await until_asked(server, _ASKED_WITHIN_S)  # those just accepted deliver their request first
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(door.quiet(), drain_s)
    streams.close()
    server.should_exit = True


def record(instances: Iterable[Instance], pid: int) -> HandOver:
    """The hand-over record of process ``pid`` and its ``instances``, as they are now."""
    servers, starting = [], []
    for instance in instances:
        server = _handed(instance)
        if server is not None:
            servers.append(server)
        elif instance.active:
            starting.append(instance.name)
    return HandOver(daemon_pid=pid, servers=servers, starting=starting)


def _handed(instance: Instance) -> HandedServer | None:
    pid, port, spec = instance.pid, instance.port, instance.spec
    if instance.state not in _SERVING or not instance.running or pid is None or port is None or spec is None:
        return None
    try:
        created = psutil.Process(pid).create_time()
    except psutil.Error:
        return None
    return HandedServer(
        instance=instance.name,
        pid=pid,
        create_time=created,
        port=port,
        argv=spec.argv,
        settings_json=instance.settings.model_dump_json(),
        plan=instance.plan,
    )


def hand_over(
    wired: Wired, sock: socket.socket, notifier: Notifier, bridge: subprocess.Popen[bytes] | None
) -> OSError | StopAsked:
    """Tell the service manager, record the servers and execute the program again (`reexec`), naming
    ``bridge`` to the new program; when that did not happen, the bridge is stopped."""
    notifier.send(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
    named = {} if bridge is None else {BRIDGE_ENV: handing_fds([bridge.pid])}  # a pid, bound to ours as fds are
    outcome = reexec(wired.state_lock, record(wired.manager.instances.values(), os.getpid()), sock, named)
    if bridge is not None:
        upgrade_bridge.kill(bridge)
    return outcome


def release_held_signals() -> None:
    """Unblock the signals an upgrade held across its exec (`HELD_ACROSS_EXEC`), once their handlers are in
    place: one that came meanwhile is handled now. Before anything is started: a child inherits the mask."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_ACROSS_EXEC)


class StopAsked(Exception):
    """SIGTERM or SIGINT came during the hand-over: the daemon stops instead of executing its program (the
    event loop, which handles them otherwise, does not run again before the exec: it would be lost)."""

    def __init__(self, sig: int) -> None:
        super().__init__(signal.Signals(sig).name)
        self.signal = signal.Signals(sig)


def _stop_asked(sig: int, _frame: object) -> None:
    raise StopAsked(sig)


def reexec(lock: StateDirLock, handover: HandOver, sock: socket.socket, env: dict[str, str]) -> OSError | StopAsked:
    """Write ``handover``, and execute this program again with the same command line, handing ``sock`` and
    the state directory's ``lock`` over (no other daemon can take the directory while the new one starts).
    ``env`` goes into its environment. Returns only when that did not happen (an OSError, or a stop asked for
    meanwhile), with everything as it was (the record removed, ``sock`` and the lock not inheritable, the
    signal handlers back)."""
    state_dir = lock.state_dir
    stopping = {sig: signal.signal(sig, _stop_asked) for sig in _STOPPING}
    previous = {}
    try:
        write(state_dir, handover)
        env = {**os.environ, **env, LISTEN_FD_ENV: handing_fds([sock.fileno()]), **lock.hand_over()}
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _IGNORED_MEANWHILE}
        sock.set_inheritable(True)
        log.info("upgrade: executing %s with %d server(s) handed over", " ".join(sys.orig_argv), len(handover.servers))
        for log_handler in logging.getLogger().handlers:
            log_handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        signal.pthread_sigmask(signal.SIG_BLOCK, HELD_ACROSS_EXEC)
        os.execve(sys.executable, sys.orig_argv, env)
    except (OSError, StopAsked) as exc:
        for sig, handler in {**stopping, **previous}.items():
            if handler is not None:
                signal.signal(sig, handler)
        release_held_signals()  # one that came meanwhile goes to the handler just put back
        sock.set_inheritable(False)
        lock.keep_back()
        for path in (state_dir.handover_file, state_dir.handover_file.with_suffix(".tmp")):
            with contextlib.suppress(OSError):  # not there, or not ours to remove (a directory)
                path.unlink()
        return exc
    raise AssertionError("unreachable: execve returned without an error")  # pragma: no cover
