"""One configured model's lifecycle: spawn, wait for ready, watch, restart by policy, stop.

Every state change happens in this one supervision task per instance; start/stop/restart requests are
serialised by a lock, and concurrent restart requests join the one already under way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import stat
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import httpx

from launcher.backends import Health, LaunchSpec, ServerBackend
from launcher.config_model import ModelSettings
from launcher.errors import ConflictError, LauncherError
from launcher.plan import verdict
from launcher.plan.measured import with_process_mib
from launcher.plan.placement import Placement
from launcher.schema_gpus import GpuProcess
from launcher.schema_instances import Download, Event, InstanceStatus, State
from launcher.schema_plans import Plan, PlanCheck
from launcher.statedir import logs
from launcher.statedir.layout import StateDir
from launcher.supervise import drain, slot_cache
from launcher.supervise.leftovers import INSTANCE_ENV, ChildRegistry
from launcher.supervise.measuring import Measuring
from launcher.supervise.policy import RestartPolicy, StartFailure
from launcher.supervise.ports import ensure_port_free
from launcher.supervise.process import ExitStatus, ServerProcess
from launcher.supervise.server_errors import server_error
from launcher.supervise.slot_store import SlotStore, gib_bytes
from launcher.supervise.transitions import check_transition
from launcher.supervise.vram import VramGate
from launcher.supervise.writes import StateWrites

log = logging.getLogger("launcher")

_FIRST_LOAD_PROBE_S = 0.01  # a tiny model is ready in 50 ms; big ones back off to _MAX
_MAX_LOAD_PROBE_S = 0.5
_EVENTS_KEPT = 50
_LOG_LINES_READ = 200  # of a server that ended: where its last error lines are looked for
_LINES_AT_THE_END = 20  # of a server that served before it ended: where why it ended is looked for
# Of a server just ready: where its load log (what it allocated per device) is looked for. A -lv 4 load
# of a large model writes a few hundred lines; the start marker bounds it first.
_LOAD_LINES_READ = 5000
# The states a planned stop saves the slots' prompt caches from: the server served until now.
_SAVED_FROM = frozenset({State.READY, State.UNHEALTHY, State.DRAINING})


class BlockedCheck(Protocol):
    """Asked when a server ended: why it cannot run now (a peer's rpc-server its plan uses is away), or
    None. Such an exit holds the instance degraded instead of going through the restart policy."""

    async def blocked(self, instance: Instance) -> str | None: ...


@dataclass(frozen=True)
class DaemonParts:
    """The parts of the daemon every instance uses, handed over when it is made."""

    http: httpx.AsyncClient
    state_dir: StateDir
    registry: ChildRegistry
    log_max_bytes: int
    log_keep: int
    # A spawn waits at it for the memory its plan claims; a server that ended tells it what it held.
    vram: VramGate
    on_event: Callable[[Event], None]
    # Failed writes to the state directory, counted daemon-wide (see writes.py).
    writes: StateWrites
    # The front door's requests in flight on each instance, which a planned stop waits for (drain.py).
    requests: drain.InFlight
    # None: no peers, so nothing outside this host can keep a server from running.
    blocked: BlockedCheck | None = None
    # What a ready server measured is kept here for the next plan (None: not kept).
    measuring: Measuring | None = None
    # The processes on these GPUs and what each holds, read now (None: no GPU reading of processes).
    gpu_processes: Callable[[Sequence[int]], Awaitable[Mapping[int, tuple[GpuProcess, ...] | None]]] | None = None
    # Where llama-servers save their slots' prompt caches at a planned stop; None: they save none.
    slot_store: SlotStore | None = None


class Instance:
    def __init__(
        self, name: str, settings: ModelSettings, *, backend: ServerBackend, parts: DaemonParts, group: str = ""
    ) -> None:
        self.name = name
        self.group = group or name
        self.settings = settings
        self.backend = backend
        self.log_path = parts.state_dir.server_log(name)
        self.port: int | None = settings.port if isinstance(settings.port, int) else None
        self.placement = Placement()
        self.plan: Plan | None = None  # the plan of the current (or last) start
        self.spec: LaunchSpec | None = None  # the command line and environment of the current (or last) run
        self._parts = parts
        self._policy = RestartPolicy(settings.restart)
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._restarting: asyncio.Future[None] | None = None
        self._changed = asyncio.Event()
        self._proc: ServerProcess | None = None
        self.state = State.STOPPED
        self._state_since = time.monotonic()
        self._ready_since: float | None = None
        self.restarts = 0
        self.last_exit: ExitStatus | None = None
        self.last_error: str | None = None
        self.events: deque[Event] = deque(maxlen=_EVENTS_KEPT)
        # What the server said as its last runs ended (in last_error and exit events): shown to the holder
        # of the API token alone, as its log is (launcher/api/redact.py).
        self.server_words: deque[str] = deque(maxlen=_EVENTS_KEPT)
        self.server_info: dict[str, int] = {}  # what the server reports of itself (Ollama: sizes)
        self._last_notice: str | None = None
        self.degraded_reason: str | None = None
        # The plan of the running server against what it reports allocating: read once it is ready.
        self.actual: PlanCheck | None = None
        self.actual_missing: str | None = None
        # A hub model's files being fetched before its start (the manager's task) and how far it is.
        self._download_task: asyncio.Task[None] | None = None
        self.download: Download | None = None
        # Why it starts no server any more (a reload removed it, the daemon is stopping), or None.
        self._retired: str | None = None
        # The key of the current start's prompt caches (slot_cache.py); None: it saves and restores none.
        self._slot_key: str | None = None

    def retire(self, reason: str) -> None:
        """Start no server from now on, ``reason`` saying why: a start or restart that waits on the lock
        meanwhile is refused when it gets it, and a server that ends is not restarted by the policy. A running
        server runs on until it is stopped (`stop`, which a retired instance still takes)."""
        self._retired = reason

    def refuse_if_retired(self) -> None:
        """ConflictError once retired: a download before a start checks it too (before and after its plan)."""
        if self._retired is not None:
            raise ConflictError(f"{self.name} does not start: {self._retired}")

    def reconfigure(self, settings: ModelSettings, backend: ServerBackend) -> None:
        """Take the settings of a reload. What supervision reads as it goes (restart policy, health probes,
        stop timeout) applies from now on; the rest (command line, environment, port, placement) at the next
        start: the manager stops a running server before it changes any of those."""
        if self.active and settings.port != self.settings.port:
            raise ConflictError(f"{self.name} runs: stop it before changing its port")
        if isinstance(settings.port, int):
            self.port = settings.port
        elif isinstance(self.settings.port, int):
            self.port = None  # from a fixed port to `auto`: a free one at the next start
        self.settings, self.backend = settings, backend
        self._policy.use(settings.restart)

    # ---- requests -------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """A server process of this instance is alive (it holds memory)."""
        return self._proc is not None and self._proc.running

    @property
    def pid(self) -> int | None:
        """The pid of its server process (the current or last one of this run)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        """`running`, asked of the system: false from the moment the process is dead (a zombie included),
        before the event loop has reaped it."""
        return self._proc is not None and self._proc.alive

    @property
    def restarting(self) -> bool:
        """A restart is under way (from its stop to its start)."""
        return self._restarting is not None

    @property
    def active(self) -> bool:
        """A supervision task runs (from starting to backoff)."""
        return self._task is not None and not self._task.done()

    @property
    def downloading(self) -> bool:
        """A download of its files runs (the state says downloading until the start that follows it)."""
        return self._download_task is not None and not self._download_task.done()

    def begin_download(self, task: asyncio.Task[None], what: str) -> None:
        """Show ``task`` (the download of its files, before a start) as the state `downloading`; a stop
        cancels it, and a download that fails leaves the instance failed with its reason."""
        if self.active or self.downloading:
            raise ConflictError(f"{self.name} is already {self.state}")
        self.download = None
        self.last_error = None
        self._download_task = task
        self._set_state(State.DOWNLOADING, what)
        task.add_done_callback(self._download_ended)

    def download_progress(self, progress: Download) -> None:
        """How far the download is; an event at each tenth of the way (the API has every reading)."""
        before = self.download
        self.download = progress
        if before is None or _tenth(before) != _tenth(progress):
            self._emit("download", progress.describe())
        else:
            self._changed.set()

    def _download_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self.state != State.DOWNLOADING:
            return
        exc = task.exception()
        if exc is not None:
            message = exc.message if isinstance(exc, LauncherError) else f"{type(exc).__name__}: {exc}"
            hint = exc.hint if isinstance(exc, LauncherError) else None
            self._record_error(message + (f" ({hint})" if hint else ""))
            self._set_state(State.FAILED)

    async def _stop_download(self) -> None:
        """Cancel the download under way; its partial files stay for the next start to resume."""
        task = self._download_task
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([task])
        self._set_state(State.STOPPED, "download stopped; what was fetched is kept for the next start")

    async def start(self, prepare: Callable[[Instance], Awaitable[None]]) -> None:
        """Start supervising; ``prepare`` (port and placement) runs first, under the instance's lock."""
        async with self._lock:
            self.refuse_if_retired()
            if self.active:
                raise ConflictError(f"{self.name} is already {self.state}")
            await prepare(self)
            self._begin(self.preflight())

    async def adopt(
        self, proc: ServerProcess, port: int, placement: Placement, plan: Plan | None, argv: list[str]
    ) -> None:
        """Supervise a server that already serves: the daemon's previous program started it with ``argv``, and
        an upgrade handed it over (supervise/adoption.py checked it is the same process, with these settings,
        and that it answers). It goes through starting and loading to ready at once, with no new process; its
        next start takes the command this program builds."""
        async with self._lock:
            if self.active:
                raise ConflictError(f"{self.name} is already {self.state}")
            self.port, self.placement, self.plan = port, placement, plan
            spec = self._with_slot_cache(self.backend.launch_spec(self.settings, port, placement))
            self._begin(LaunchSpec(argv=argv, env=spec.env), adopted=proc)

    async def stop(self) -> None:
        if self.downloading:
            await self._stop_download()
            return
        async with self._lock:
            if not self.active and self.state == State.STOPPED:
                raise ConflictError(f"{self.name} is not running")
            await self._drain()
            await self._halt()

    async def drain(self) -> None:
        """Take the server out of the front door and wait for its requests in flight (the first half of a
        planned stop: the daemon's own stop drains every instance at once before the API closes)."""
        async with self._lock:
            await self._drain()

    async def hold(self, reason: str) -> None:
        """Stop the server (if it runs) and wait degraded: an endpoint its plan uses went away."""
        async with self._lock:
            await self._halt(State.DEGRADED, reason)

    @property
    def ready_for_s(self) -> float | None:
        """Seconds it has been ready (unhealthy counts), None when not."""
        return None if self._ready_since is None else time.monotonic() - self._ready_since

    async def restart(self, prepare: Callable[[Instance], Awaitable[None]]) -> None:
        """Stop (if running) and start again; concurrent requests join the restart under way."""
        if self._restarting is None:
            self._restarting = asyncio.ensure_future(self._restart_once(prepare))
        await asyncio.shield(self._restarting)

    async def _restart_once(self, prepare: Callable[[Instance], Awaitable[None]]) -> None:
        try:
            async with self._lock:
                # Refuse before stopping a running server that could not come back (its port is its own).
                # Its command waits for the new placement, made once the old server's memory is back.
                self.refuse_if_retired()
                port = self._startable_port()
                self.backend.binary(self.settings)
                if self.active:
                    await self._drain()
                    await self._halt()
                else:
                    ensure_port_free(port)
                self.refuse_if_retired()  # retired during the drain: stopped, and not started again
                await prepare(self)
                self._begin(self.preflight())
        finally:
            self._restarting = None

    async def restart_with(
        self, settings: ModelSettings, backend: ServerBackend, prepare: Callable[[Instance], Awaitable[None]]
    ) -> None:
        """A reload's change, as one restart under the instance's lock: a running server drained and stopped,
        the new settings taken, and started again with them. The front door keeps its queue meanwhile (the
        instance is restarting), and no start can slip in between with the old settings. One that does not
        run takes the settings alone."""
        while self._restarting is not None:  # a restart asked for first ends first
            with contextlib.suppress(Exception):
                await asyncio.shield(self._restarting)
        self._restarting = asyncio.ensure_future(self._restart_with(settings, backend, prepare))
        # Its caller may be gone (a reload cancelled as the daemon stops): its error is read, not lost in the log.
        self._restarting.add_done_callback(lambda done: done.cancelled() or done.exception())
        await asyncio.shield(self._restarting)

    async def _restart_with(
        self, settings: ModelSettings, backend: ServerBackend, prepare: Callable[[Instance], Awaitable[None]]
    ) -> None:
        try:
            async with self._lock:
                running = self.active
                if running:
                    await self._drain()
                    await self._halt()
                self.reconfigure(settings, backend)
                if running:
                    self.refuse_if_retired()  # the daemon began to stop meanwhile: stopped, not started again
                    await prepare(self)
                    self._begin(self.preflight())
        finally:
            self._restarting = None

    async def wait_until(self, predicate: Callable[[Instance], bool], timeout_s: float | None = None) -> None:
        """Return once ``predicate(self)`` holds after some state change (or already holds)."""
        async with asyncio.timeout(timeout_s):
            while not predicate(self):
                self._changed.clear()
                await self._changed.wait()

    def check_model_file(self) -> None:
        self.backend.check_model(self.settings, self.name)

    def preflight(self) -> LaunchSpec:
        """Everything that can be checked before spawning, and the command to spawn (computed once per
        start of a process); raises with the reason."""
        port = self._startable_port()
        base = self.backend.launch_spec(self.settings, port, self.placement)
        ensure_port_free(port)
        return self._with_slot_cache(base)

    def _with_slot_cache(self, base: LaunchSpec) -> LaunchSpec:
        """``base`` with the directory of the slots' prompt caches (`command`), made, and the key of this
        run's caches taken; ``base`` itself when it keeps none."""
        spec = self.command(base)
        self._slot_key = None if spec is base else self._prepare_slot_cache(spec)
        return spec if self._slot_key is not None else base

    def command(self, spec: LaunchSpec) -> LaunchSpec:
        """``spec`` (the backend's) as this instance runs it: a llama-server's with the directory its slots'
        prompt caches are saved in; unchanged when it saves none (or its args name their own directory)."""
        store = self._parts.slot_store
        if (
            store is None
            or self.backend.name != "llama-server"
            or self.settings.kv_cache_max_gib <= 0
            or slot_cache.SAVE_PATH_FLAG in spec.argv
        ):
            return spec
        return replace(spec, argv=[*spec.argv, slot_cache.SAVE_PATH_FLAG, str(store.directory(self.name))])

    def _prepare_slot_cache(self, spec: LaunchSpec) -> str | None:
        """The directory of the slots' prompt caches made, and the key of this start's; None when it cannot
        be made (the start goes on without)."""
        assert self._parts.slot_store is not None  # `command` added its directory
        try:
            return self._parts.slot_store.prepare(self.name, spec.argv)
        except OSError as exc:
            self._emit("kv-cache", f"prompt caches not kept: {exc}")
            return None

    def _startable_port(self) -> int:
        """The port assigned, once the model file is seen to be there."""
        self.check_model_file()
        if self.port is None:
            raise ConflictError(f"{self.name} has no port assigned")
        return self.port

    def placed(self, port: int, placement: Placement, plan: Plan) -> None:
        """Where the next start runs: its port, and its placement on the GPUs by ``plan`` (the manager's
        placement, just before the start)."""
        self.port, self.placement, self.plan = port, placement, plan

    def record_refusal(self, exc: LauncherError) -> None:
        """Record why a start asked for was refused before anything ran: its caller hears it, the instance
        shows it (`last_error`); the state stays what it was."""
        self._record_error(exc.message)

    def refuse(self, exc: LauncherError) -> None:
        """Record a start that was refused before anything ran (autostart has no caller to tell), and fail."""
        self.record_refusal(exc)
        self._set_state(State.FAILED)

    def _begin(self, spec: LaunchSpec, adopted: ServerProcess | None = None) -> None:
        """Supervise from now on, the first run with ``spec`` (the start's, checked as it was asked for), or
        the ``adopted`` server, already running with it."""
        self._policy.reset()
        self.last_error = None
        self.spec = spec
        self._set_state(State.STARTING)  # the answer to a start request already says so
        self._task = asyncio.create_task(self._supervise(spec, adopted), name=f"supervise:{self.name}")
        self._task.add_done_callback(self._supervision_ended)

    async def _drain(self) -> None:
        """Wait for the front door's requests in flight on the server, ``drain_timeout_s`` at most, given no
        new one meanwhile (the router serves only a ready instance); a drain's end is an event."""
        in_flight, timeout_s = self._parts.requests.on(self.name), self.settings.drain_timeout_s
        if not self.active or not drain.needed(self.state, in_flight, timeout_s):
            return
        self._set_state(State.DRAINING, drain.began(in_flight, timeout_s))
        began_s, supervision = time.monotonic(), self._task
        assert supervision is not None  # active
        finished = asyncio.ensure_future(self._parts.requests.finished(self.name, timeout_s))
        try:
            # A server that ends by itself meanwhile ends the wait: its requests are cut, not finished.
            await asyncio.wait([finished, supervision], return_when=asyncio.FIRST_COMPLETED)
        finally:
            finished.cancel()
        left = self._parts.requests.on(self.name)
        waited_s = time.monotonic() - began_s
        if supervision.done() or not self.alive:
            self._emit("drain", drain.ended_by_itself(in_flight, waited_s))
        else:
            self._emit("drain", drain.ended(in_flight, left, waited_s, timeout_s))

    async def _halt(self, final: State = State.STOPPED, why: str = "") -> None:
        task = self._task
        if task is not None and not task.done():
            served = self.state in _SAVED_FROM and self.running
            self._set_state(State.STOPPING)
            if final == State.STOPPED and served:  # a planned stop: not a hold, whose server lost a peer
                await self._save_slots()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([task])  # an error it ended by is `_supervision_ended`'s to record
        self._set_state(final, why)

    # ---- supervision ----------------------------------------------------------------------------

    async def _supervise(self, first: LaunchSpec, adopted: ServerProcess | None) -> None:
        spec: LaunchSpec | None = first
        try:
            while True:
                try:
                    if adopted is not None:
                        delay = await self._run_adopted(adopted, first)
                    else:
                        delay = await self._run_once(spec)
                except Exception as exc:  # a fault nobody foresaw: this run failed, the restart policy decides
                    delay = await self._run_raised(exc)
                if delay is None:
                    return
                if self._retired is not None:  # no new server for a retired instance
                    self._set_state(State.FAILED, f"not restarted: {self._retired}")
                    return
                spec, adopted = None, None  # the next run is a new start of the process: checked and computed again
                self._set_state(State.BACKOFF, f"restarting in {delay:.2f}s")
                await asyncio.sleep(delay)
                self.restarts += 1
        finally:
            if self._proc is not None:  # cancelled: a stop or restart was asked for
                await self._end(self._proc, " (stopped on request)")

    async def _run_raised(self, exc: Exception) -> float | None:
        """A run that raised: its server (if any) is stopped, and it counts as a failed run."""
        log.error("%s: supervision error", self.name, exc_info=exc)
        self._record_error(f"supervision error: {type(exc).__name__}: {exc}")
        self._ready_since = None
        if self._proc is not None:
            await self._end(self._proc, "")
        return self._decide(failure=True, ready_for_s=None)

    def _supervision_ended(self, task: asyncio.Task[None]) -> None:
        """The safety net: a supervision task that ended by an error (one in stopping its server, past
        `_run_raised`) leaves the instance failed with its server killed, never claiming a state it lost."""
        if task.cancelled() or (exc := task.exception()) is None:
            return
        log.error("%s: supervision ended", self.name, exc_info=exc)
        proc, self._proc, self._ready_since = self._proc, None, None
        if proc is not None:
            proc.kill()
            self._write(self._parts.registry.path, lambda: self._parts.registry.remove(proc.pid))
        self._record_error(f"supervision ended by an error: {type(exc).__name__}: {exc}")
        self._set_state(State.FAILED)

    def _write(self, what: Path, write: Callable[[], object]) -> None:
        """A write to the state directory, which must never end supervision: a failure is counted and the
        write dropped; the first failure of a streak and the write that ends it are told."""
        notice = self._parts.writes.attempt(str(what), write)
        if notice is not None:
            self._emit("storage", notice)

    async def _end(self, proc: ServerProcess, why: str, *, served: bool = False) -> tuple[ExitStatus, str | None]:
        """Stop the server if it still runs, and record how it ended: with the server's own error lines
        when it ended by itself (read before the launcher's exit marker goes in). Of a server that
        ``served``, its last lines alone: an error it answered a request with hours ago is not why it ended."""
        lines = [] if proc.running else self._lines_of_last_run()
        error = server_error(lines[-_LINES_AT_THE_END:] if served else lines)
        status = await proc.stop(self.settings.stop_timeout)
        self._proc = None
        self._write(self._parts.registry.path, lambda: self._parts.registry.remove(proc.pid))
        if self.placement.claims_mib:
            self._parts.vram.vacated(self.placement.claims_mib)
        self.last_exit = status
        if error is not None:
            self.server_words.append(error)
            self.last_error = error
        self._write(self.log_path, lambda: logs.write_marker(self.log_path, f"{self.name} {status.describe()}{why}"))
        self._emit("exit", f"server {status.describe()}{why}" + (f": {error}" if error else ""))
        return status, error

    def _lines_of_last_run(self, lines: int = _LOG_LINES_READ) -> list[str]:
        return logs.lines_of_last_run(self.log_path, lines)

    async def _run_once(self, spec: LaunchSpec | None) -> float | None:
        """Run the server once, until it ends; return the delay before the next start or None. ``spec``:
        the command of a start asked for; None after a restart by the policy, which checks again."""
        if self.state != State.STARTING:
            self._set_state(State.STARTING)
        if spec is None:
            try:
                spec = self.spec = self.preflight()
            except LauncherError as exc:
                self._record_error(exc.message)
                return self._decide(failure=True, ready_for_s=None)
        if self.placement.claims_mib:
            await self._parts.vram.await_vram(self.placement.claims_mib, self.name)
        self._rotate_log()
        self.actual, self.actual_missing = None, None
        marker = f"{self.name} (restart {self.restarts}): {' '.join(spec.argv)}"
        self._write(self.log_path, lambda: logs.write_start_marker(self.log_path, marker))
        # The instance's name in the environment: how a later daemon recognises a leftover as ours.
        proc = self._proc = await ServerProcess.spawn(
            replace(spec, env={**spec.env, INSTANCE_ENV: self.name}), self.log_path
        )
        argv0 = spec.argv[0]
        self._write(self._parts.registry.path, lambda: self._parts.registry.add(self.name, proc.pid, argv0))
        self._set_state(State.LOADING, f"pid {proc.pid} on port {self.port}")
        ready = await self._await_ready(proc)
        if ready:  # before it is marked ready: its first request finds the prompts a planned stop saved
            await self._restore_slots()
        return await self._run_until_end(proc, spec, ready=ready)

    async def _run_adopted(self, proc: ServerProcess, spec: LaunchSpec) -> float | None:
        """Run an adopted server (see `adopt`) until it ends, as `_run_once` runs one it spawned."""
        self._proc = proc
        self._set_state(State.LOADING, f"pid {proc.pid} on port {self.port}, taken over from the previous program")
        return await self._run_until_end(proc, spec, ready=True)

    async def _run_until_end(self, proc: ServerProcess, spec: LaunchSpec, *, ready: bool) -> float | None:
        """Serve with ``proc`` (``ready``, or not within its load timeout) until it ends; the delay before
        the next start or None."""
        unhealthy = False
        ready_for_s: float | None = None
        if ready:
            self._ready_since = time.monotonic()
            self._set_state(State.READY)
            await self._check_plan()
            unhealthy = await self._watch(proc)
            ready_for_s = time.monotonic() - self._ready_since
            self._ready_since = None
        elif proc.running:
            self._record_error(f"not ready within load_timeout ({self.settings.health.load_timeout:g}s)")
        status, error = await self._end(proc, "", served=ready_for_s is not None)
        if self.state == State.DRAINING:  # it ended by itself while a planned stop waited for its requests:
            # that stop ends it; a restart by the policy would make a server the stop then cuts
            ended = State.STOPPED if status.success and not unhealthy else State.FAILED
            self._set_state(ended, "it ended during its drain: not restarted, a stop was under way")
            return None
        reason = None if self._parts.blocked is None else await self._parts.blocked.blocked(self)
        if reason is not None:  # not the server's fault: no restart (and none of the policy's budget)
            self._set_state(State.DEGRADED, reason)
            return None
        # A server that ended by itself before it was ready, saying what it said last time with the same
        # command and files: it will say it again, so retrying only delays the news.
        start_failure = None
        if ready_for_s is None and error is not None:
            start_failure = StartFailure(error, _start_inputs(spec.argv, spec.env))
        if self._policy.repeats(start_failure):
            self._set_state(State.FAILED, "it failed to start twice in a row with the same error: not retried")
            return None
        failure = unhealthy or not status.success or ready_for_s is None
        return self._decide(failure=failure, ready_for_s=ready_for_s, said=error)

    def _decide(self, *, failure: bool, ready_for_s: float | None, said: str | None = None) -> float | None:
        """What the policy makes of a run's end; ``said``: the server's words as it ended, kept first in the
        error when the policy gives up."""
        delay = self._policy.next_delay(failure=failure, ready_for_s=ready_for_s, now=time.monotonic())
        if delay is None:
            if failure and self.settings.restart.policy != "never":
                gave_up = (
                    f"gave up after more than {self.settings.restart.burst} restarts "
                    f"in {self.settings.restart.interval:g}s"
                )
                self._record_error(gave_up if said is None else f"{said} ({gave_up})")
            self._set_state(State.FAILED if failure else State.STOPPED)
        return delay

    async def _save_slots(self) -> None:
        """Save the slots' prompt caches, half the stop timeout at most: the halt that follows has the rest."""
        store, key = self._parts.slot_store, self._slot_key
        if store is None or key is None or self.port is None:
            return
        budget_s = self.settings.stop_timeout / 2
        said = await store.save(self.name, self.port, key, budget_s, gib_bytes(self.settings.kv_cache_max_gib))
        self._emit("kv-cache", said)

    async def _restore_slots(self) -> None:
        """Before a ready server is marked ready: the prompt caches a planned stop of the same model with
        the same settings saved, so its first request does not compute its prompt again."""
        store, key = self._parts.slot_store, self._slot_key
        if store is None or key is None or self.port is None:
            return
        said = await store.restore(self.name, self.port, key, self.settings.health.load_timeout)
        if said is not None:
            self._emit("kv-cache", said)

    async def _await_ready(self, proc: ServerProcess) -> bool:
        """Probe until ready; False when the process ended or the load timed out."""
        deadline = time.monotonic() + self.settings.health.load_timeout
        interval = _FIRST_LOAD_PROBE_S
        assert self.port is not None
        while proc.running:
            if await self.backend.is_ready(self._parts.http, self.port, self.settings.health.timeout):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.wait([proc.exited], timeout=min(interval, remaining))
            interval = min(interval * 1.5, _MAX_LOAD_PROBE_S)
        return False

    async def _watch(self, proc: ServerProcess) -> bool:
        """Watch a ready server until it ends; True when it was ended for failing its health checks."""
        health = self.settings.health
        failures = 0
        assert self.port is not None
        while True:
            done, _ = await asyncio.wait([proc.exited], timeout=health.interval)
            if done:
                return False
            self._rotate_log()
            found = await self.backend.health(self._parts.http, self.port, health.timeout)
            if found.ok:
                failures = 0
                self._take(found)
                if self.state == State.UNHEALTHY:
                    self._set_state(State.READY, "health checks pass again")
                continue
            if not proc.running:
                return False
            failures += 1
            if self.state != State.DRAINING:  # a draining server is on its way out, served or not
                self._set_state(State.UNHEALTHY, f"health check failed {failures}/{health.failures}")
            if failures >= health.failures:
                self._record_error(f"killed after {failures} failed health checks")
                return True

    async def _check_plan(self) -> None:
        """Once, after ready (never delaying it): the plan against what the server says it allocated, from
        its output since its start. A log that cannot be read is a missing check, never a failed run."""
        if self.plan is None:
            self.actual_missing = "the start had no plan"
            return
        try:
            lines = await asyncio.to_thread(self._lines_of_last_run, _LOAD_LINES_READ)
        except OSError as exc:
            self.actual_missing = f"the server's log could not be read: {exc.strerror or exc}"
            return
        found = self.backend.check_plan(self.plan, lines)
        if isinstance(found, str):
            self.actual, self.actual_missing = None, found
            return
        local = [d.gpu for d in self.plan.devices if d.endpoint is None]
        if local and self._parts.gpu_processes is not None and self._proc is not None:
            found = with_process_mib(found, self.plan, self._proc.pid, await self._parts.gpu_processes(local))
        self.actual = found = found.model_copy(update={"findings": verdict.findings(self.group, found)})
        for finding in found.findings:  # short: a warning (the way to an out-of-memory crash); over: unused
            self._emit("plan-warning" if finding.over else "plan-info", finding.message)
        await self._keep_measurement(self.plan, found)

    async def _keep_measurement(self, plan: Plan, check: PlanCheck) -> None:
        """File what the server measured, for the next plan of the same model, settings and server."""
        measuring, spec = self._parts.measuring, self.spec
        model_file = self.backend.model_file(self.settings)
        if measuring is None or spec is None or model_file is None:
            return
        binary = Path(spec.argv[0])

        def record() -> None:
            measuring.record(self.group, self.settings, model_file, binary, plan, check)

        notice = await asyncio.to_thread(self._parts.writes.attempt, str(measuring.path), record)
        if notice is not None:
            self._emit("storage", notice)

    def _rotate_log(self) -> None:
        parts = self._parts
        self._write(self.log_path, lambda: logs.rotate_if_large(self.log_path, parts.log_max_bytes, parts.log_keep))

    def _take(self, found: Health) -> None:
        """Keep what a healthy probe reported, and tell once each new warning or reload."""
        if found.details:
            self.server_info = dict(found.details)
        notice = found.warning or ("the server dropped the model; loading it again" if found.reloading else None)
        if notice is not None and notice != self._last_notice:
            self._emit("warning", notice)
        self._last_notice = notice

    # ---- reporting ------------------------------------------------------------------------------

    def _set_state(self, state: State, message: str = "") -> None:
        # A bug raises: in a run, as a failed run (`_run_raised`); elsewhere in the task, the safety net
        # (`_supervision_ended`) leaves it failed; in a request, the request fails.
        check_transition(self.state, state)
        self.degraded_reason = message if state == State.DEGRADED else None
        if state != self.state:
            self.state = state
            self._state_since = time.monotonic()
        self._emit("state", message or state.value)

    def _record_error(self, message: str) -> None:
        self.last_error = message
        self._emit("error", message)

    def note(self, kind: str, message: str) -> None:
        """Record something that happened to the instance from outside (a hot GPU)."""
        self._emit(kind, message)

    def _emit(self, kind: str, message: str) -> None:
        event = Event.now(kind, message, instance=self.name, state=self.state)
        self.events.append(event)
        self._changed.set()
        self._parts.on_event(event)

    def status(self, events: int = 10, requests: tuple[int, int] = (0, 0)) -> InstanceStatus:
        """What the API shows of it; ``requests``: the front door's requests in flight and queued."""
        now = time.monotonic()
        return InstanceStatus(
            name=self.name,
            model=str(self.settings.model) if self.settings.model is not None else "",  # an rpc-server has none
            backend=self.settings.backend,
            state=self.state,
            pid=self.pid,
            port=self.port,
            gpus=list(self.placement.gpus) if self.active else [],
            tensor_split=list(self.placement.tensor_split),
            vram_mib=sum(self.placement.claims_mib.values()) if self.active and self.placement.gpus else None,
            restarts=self.restarts,
            last_exit=self.last_exit.describe() if self.last_exit else None,
            last_exit_code=self.last_exit.code if self.last_exit else None,
            last_exit_signal=self.last_exit.signal if self.last_exit else None,
            last_error=self.last_error,
            autostart=self.settings.autostart,
            state_age_s=round(now - self._state_since, 3),
            uptime_s=round(now - self._ready_since, 3) if self._ready_since is not None else None,
            log_path=str(self.log_path),
            log_line=logs.last_line(self.log_path),
            # Why it is down, in the server's words: what it wrote before it last ended.
            log_tail=self._lines_of_last_run()[-10:] if self.state in (State.FAILED, State.BACKOFF) else [],
            plan=self.plan,
            server_info=self.server_info,
            group=self.group,
            events=list(self.events)[-events:] if events > 0 else [],
            requests_in_flight=requests[0],
            requests_queued=requests[1],
            degraded_reason=self.degraded_reason,
            actual=self.actual if self.running else None,
            actual_missing=self.actual_missing if self.running else None,
            download=self.download if self.state == State.DOWNLOADING else None,
        )


def _tenth(download: Download) -> int:
    return 10 * download.done_bytes // download.total_bytes if download.total_bytes else 10


def _start_inputs(argv: list[str], env: Mapping[str, str]) -> tuple[object, ...]:
    """What a start was made of, to tell a repeat from a retry that could go otherwise: the command, the
    environment, and the size and modification time of every regular file the command names (binary,
    model); not a folder's (the prompt cache folder's changes as caches come and go)."""
    files = []
    for arg in argv:
        if arg.startswith("/"):
            with contextlib.suppress(OSError):
                found = Path(arg).stat()
                if stat.S_ISREG(found.st_mode):
                    files.append((arg, found.st_size, found.st_mtime_ns))
    return (tuple(argv), tuple(sorted(env.items())), tuple(files))
