"""The hand-over record of an upgrade: what the daemon's old program leaves its new one.

An upgrade (SIGUSR2, `POST /daemon/upgrade`) re-executes the installed program in the same process
(launcher/upgrade.py), so the servers stay its children, and their parent-death signal, tied to the main
thread that forked them, does not fire. Just before the exec the old program writes this record to
STATE_DIR/handover.json (0600); the new one takes it (reads and removes it) once it owns the directory,
and adopts each server that checks out (supervise/adoption.py). The API's listening socket is inherited:
its descriptor's number is in $LAUNCHER_LISTEN_FD, which the new program takes out of its environment at
once. A record that does not load, or names another process, is ignored: the children file's servers are
then stopped as after any restart (supervise/leftovers.py), and the models start normally.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from collections.abc import Collection

import psutil
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from launcher.process_start import same_start
from launcher.regular_file import read_regular
from launcher.schema_plans import Plan
from launcher.statedir.layout import StateDir
from launcher.statedir.owner import handed_fds
from launcher.supervise.leftovers import INSTANCE_ENV

log = logging.getLogger("launcher")

LISTEN_FD_ENV = "LAUNCHER_LISTEN_FD"
# A pid, as the kernel's pid_max bounds it.
_PID_MAX = 2**22
# A record of a thousand servers takes a few MiB (each one's settings and plan): a larger file is not one.
_RECORD_MAX_BYTES = 16 * 2**20


class HandedServer(BaseModel):
    """One server handed over: which process, where it listens, and the plan it was started with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    instance: str
    pid: int = Field(gt=1, le=_PID_MAX)
    create_time: float = Field(ge=0, allow_inf_nan=False)  # the process's start time: a reused pid is not it
    port: int = Field(gt=0, lt=65536)
    argv: list[str] = Field(min_length=1)  # its command line, which it keeps until its next start
    # Its model's settings as the old program ran it (JSON): a changed configuration is not adopted, while a
    # new program that would build another command from the same settings still takes the server over.
    settings_json: str = Field(max_length=1 << 20)
    plan: Plan | None


class HandOver(BaseModel):
    """Written by the old program right before it re-executes; valid only in the same process."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    daemon_pid: int = Field(gt=0, le=_PID_MAX)
    servers: list[HandedServer]
    # Instances on their way (starting, loading, in backoff) when it was written: started again.
    starting: list[str] = []

    @model_validator(mode="after")
    def _each_once(self) -> HandOver:
        """Each instance and each process once: the second adoption of a server would fail, and kill the
        server the first had just taken over."""
        instances = [s.instance for s in self.servers]
        pids = [s.pid for s in self.servers]
        if len(set(instances)) != len(instances) or len(set(pids)) != len(pids):
            raise ValueError("an instance or a process is named twice")
        return self


def write(state_dir: StateDir, record: HandOver) -> None:
    """Write ``record`` atomically, readable by the daemon's user alone (plans name model files). OSError is
    the caller's: the upgrade does not happen."""
    temporary = state_dir.handover_file.with_suffix(".tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(record.model_dump_json())
        os.replace(temporary, state_dir.handover_file)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise


def take(state_dir: StateDir, pid: int) -> HandOver | None:
    """The record an upgrade of process ``pid`` left, removed so it is used once; None when there is none or
    it cannot be used (logged: the servers it names are then stopped and started again)."""
    path = state_dir.handover_file
    try:
        text = read_regular(path, _RECORD_MAX_BYTES)
    except FileNotFoundError:
        return None
    except OSError as exc:  # a FIFO or a device put in its place among them: never waited on, never read
        log.warning("upgrade: %s cannot be read (%s): the servers start again", path, exc.strerror or exc)
        return None
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
    if len(text) > _RECORD_MAX_BYTES:
        log.warning("upgrade: %s is over %d MiB: not a hand-over record", path, _RECORD_MAX_BYTES >> 20)
        return None
    try:
        record = HandOver.model_validate_json(text)
    except ValidationError as exc:
        log.warning(
            "upgrade: %s is not a hand-over record (%d errors): the servers start again", path, exc.error_count()
        )
        return None
    if record.daemon_pid != pid:
        log.warning("upgrade: %s was left by process %d, not this one: ignored", path, record.daemon_pid)
        return None
    return record


def inherited_socket(host: str, port: int) -> socket.socket | None:
    """The listening socket the old program handed over (see $LAUNCHER_LISTEN_FD), when it listens on
    ``host``:``port``; one that does not (the port changed with the upgrade) is closed. Not inherited by
    anything this program starts."""
    fds = handed_fds(LISTEN_FD_ENV)
    if fds is None:
        return None
    try:
        (fd,) = fds
        sock = socket.socket(fileno=fd)
    except (ValueError, OSError) as exc:
        log.warning("upgrade: %s=%r is not a socket (%s): listening anew", LISTEN_FD_ENV, fds, exc)
        return None
    sock.set_inheritable(False)
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        bound = sock.getsockname()[:2]
    except OSError:
        listening, bound = False, None
    if listening and bound is not None and bound[1] == port and _same_host(bound[0], host):
        return sock
    log.info("upgrade: the inherited socket (%s) is not %s:%d: listening anew", bound, host, port)
    sock.close()
    return None


def _same_host(bound: str, host: str) -> bool:
    return bound == host or (host in ("localhost", "") and bound in ("127.0.0.1", "::1", "0.0.0.0"))


def still_ours(server: HandedServer) -> str | None:
    """Why ``server`` is not the handed-over process any more (gone, a reused pid, not our child, another
    instance's), or None when it is."""
    try:
        process = psutil.Process(server.pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return "it has ended"
        if not same_start(server.create_time, process.create_time()):
            return "its pid now belongs to another process"
        if process.ppid() != os.getpid():
            return "it is not this daemon's child"
        if process.environ().get(INSTANCE_ENV) != server.instance:
            return "it is not that instance's server"
    except psutil.Error:
        return "it has ended"
    return None


def reap(pid: int) -> None:
    """A handed-over server that ended since the record is still this process's child: reap it, or it stays
    a zombie for the daemon's whole life (WNOHANG: a pid that is not our child, or runs, is left as it is)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def stop_unrecorded(kept: Collection[int]) -> list[str]:
    """Kill (the group) and reap each child of this process that carries a server's mark but is not in
    ``kept``: one the old program forked as it executed the new one, before it recorded it (its start was
    suspended between the fork and the children file), which nothing would supervise; described each.
    A child that has ended is reaped (a server on its way that died during the exec, whose environment
    cannot be read any more): nothing else of this program knows it, and it would stay a zombie."""
    stopped = []
    for child in psutil.Process().children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                reap(child.pid)
                continue
            instance = child.environ().get(INSTANCE_ENV)
        except psutil.Error:
            continue
        if instance is None or child.pid in kept:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(child.pid, 0)
        stopped.append(f"{instance} (pid {child.pid})")
    return stopped
