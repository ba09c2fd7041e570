"""One configured model's lifecycle: spawn, wait for ready, watch, restart by policy, stop.

A server's runs are one supervision task per instance (supervise/server_runs.py), which moves the state
from starting to its end; the requests (start, stop, restart, hold, drain), which move it too (draining,
stopping, stopped, degraded), are serialised by a lock, and concurrent restart requests join the one
already under way. A download before a start (download_task.py), the prompt caches (prompt_caches.py) and the plan
check after ready (plan_check.py) are owned by their own parts, built here; what the API shows of an
instance is built by instance_status.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable

from launcher.backends import LaunchSpec, ServerBackend
from launcher.config_model import ModelSettings
from launcher.errors import ConflictError, LauncherError
from launcher.plan.placement import Placement
from launcher.schema_instances import Download, Event, InstanceStatus, State
from launcher.schema_plans import Plan
from launcher.supervise import drain
from launcher.supervise.download_task import DownloadTask
from launcher.supervise.instance_status import Shown, instance_status
from launcher.supervise.parts import DaemonParts
from launcher.supervise.plan_check import PlanChecker
from launcher.supervise.policy import RestartPolicy
from launcher.supervise.ports import ensure_port_free
from launcher.supervise.process import ServerProcess
from launcher.supervise.prompt_caches import PromptCaches
from launcher.supervise.record import InstanceRecord
from launcher.supervise.server_runs import ServerRuns

# The states a planned stop saves the slots' prompt caches from: the server served until now.
_SAVED_FROM = frozenset({State.READY, State.UNHEALTHY, State.DRAINING})


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
        self._parts = parts
        self._policy = RestartPolicy(settings.restart)
        self._lock = asyncio.Lock()
        self._restarting: asyncio.Future[None] | None = None
        self._record = InstanceRecord(name, parts.on_event)
        # A hub model's files being fetched before its start (the manager's task) and how far it is.
        self._download = DownloadTask(self._record)
        self._caches = PromptCaches(name, parts.slot_store, self._record)
        self._checker = PlanChecker(self.group, self.log_path, parts, self._record)
        self._runs = ServerRuns(
            self, parts=parts, record=self._record, policy=self._policy, caches=self._caches, checker=self._checker
        )
        # Why it starts no server any more (a reload removed it, the daemon is stopping), or None.
        self._retired: str | None = None

    def retire(self, reason: str) -> None:
        """Start no server from now on, ``reason`` saying why: a start or restart that waits on the lock
        meanwhile is refused when it gets it, and a server that ends is not restarted by the policy. A running
        server runs on until it is stopped (`stop`, which a retired instance still takes)."""
        self._retired = reason

    @property
    def retired(self) -> str | None:
        """Why it starts no server any more, or None (`retire`)."""
        return self._retired

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

    # ---- what it shows (its parts' records) -------------------------------------------------------

    @property
    def state(self) -> State:
        return self._record.state

    @property
    def last_error(self) -> str | None:
        return self._record.last_error

    @property
    def degraded_reason(self) -> str | None:
        return self._record.degraded_reason

    @property
    def events(self) -> deque[Event]:
        return self._record.events

    @property
    def spec(self) -> LaunchSpec | None:
        """The command line and environment of the current (or last) run."""
        return self._runs.spec

    @property
    def restarts(self) -> int:
        return self._runs.restarts

    @property
    def server_words(self) -> deque[str]:
        """What the server said as its last runs ended (see ServerRuns)."""
        return self._runs.server_words

    @property
    def server_info(self) -> dict[str, int]:
        return self._runs.server_info

    @property
    def download(self) -> Download | None:
        return self._download.progress

    # ---- requests -------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """A server process of this instance is alive (it holds memory)."""
        proc = self._runs.process
        return proc is not None and proc.running

    @property
    def pid(self) -> int | None:
        """The pid of its server process (the current or last one of this run)."""
        proc = self._runs.process
        return proc.pid if proc is not None else None

    @property
    def alive(self) -> bool:
        """`running`, asked of the system: false from the moment the process is dead (a zombie included),
        before the event loop has reaped it."""
        proc = self._runs.process
        return proc is not None and proc.alive

    @property
    def restarting(self) -> bool:
        """A restart is under way (from its stop to its start)."""
        return self._restarting is not None

    @property
    def active(self) -> bool:
        """A supervision task runs (from starting to backoff)."""
        return self._runs.active

    @property
    def downloading(self) -> bool:
        """A download of its files runs (the state says downloading until the start that follows it)."""
        return self._download.running

    def begin_download(self, task: asyncio.Task[None], what: str) -> None:
        """Show ``task`` (the download of its files, before a start) as the state `downloading`; a stop
        cancels it, and a download that fails leaves the instance failed with its reason."""
        if self.active or self.downloading:
            raise ConflictError(f"{self.name} is already {self.state}")
        self._download.begin(task, what)

    def download_progress(self, progress: Download) -> None:
        """How far the download is; an event at each tenth of the way (the API has every reading)."""
        self._download.advanced(progress)

    async def start(self, prepare: Callable[[Instance], Awaitable[None]]) -> None:
        """Start supervising; ``prepare`` (port and placement) runs first, under the instance's lock."""
        async with self._lock:
            self.refuse_if_retired()
            if self.active:
                raise ConflictError(f"{self.name} is already {self.state}")
            await prepare(self)
            self._runs.begin(self.preflight())

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
            base = self.backend.launch_spec(self.settings, port, placement)
            spec = self._caches.for_start(base, self.backend.name, self.settings)
            self._runs.begin(LaunchSpec(argv=argv, env=spec.env), adopted=proc)

    async def stop(self) -> None:
        if self.downloading:
            await self._download.stop()
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
        return self._runs.ready_for_s

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
                self._runs.begin(self.preflight())
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
                    self._runs.begin(self.preflight())
        finally:
            self._restarting = None

    async def wait_until(self, predicate: Callable[[Instance], bool], timeout_s: float | None = None) -> None:
        """Return once ``predicate(self)`` holds after some state change (or already holds)."""
        async with asyncio.timeout(timeout_s):
            while not predicate(self):
                await self._record.next_change()

    def check_model_file(self) -> None:
        self.backend.check_model(self.settings, self.name)

    def preflight(self) -> LaunchSpec:
        """Everything that can be checked before spawning, and the command to spawn (computed once per
        start of a process); raises with the reason."""
        port = self._startable_port()
        base = self.backend.launch_spec(self.settings, port, self.placement)
        ensure_port_free(port)
        return self._caches.for_start(base, self.backend.name, self.settings)

    def command(self, spec: LaunchSpec) -> LaunchSpec:
        """``spec`` (the backend's) as this instance runs it: a llama-server's with the directory its slots'
        prompt caches are saved in; unchanged when it saves none (or its args name their own directory)."""
        return self._caches.command(spec, self.backend.name, self.settings)

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
        self._record.record_error(exc.message)

    def refuse(self, exc: LauncherError) -> None:
        """Record a start that was refused before anything ran (autostart has no caller to tell), and fail."""
        self.record_refusal(exc)
        self._record.set_state(State.FAILED)

    async def _drain(self) -> None:
        """Wait for the front door's requests in flight on the server, ``drain_timeout_s`` at most, given no
        new one meanwhile (the router serves only a ready instance); a drain's end is an event."""
        in_flight, timeout_s = self._parts.requests.on(self.name), self.settings.drain_timeout_s
        if not self.active or not drain.needed(self.state, in_flight, timeout_s):
            return
        self._record.set_state(State.DRAINING, drain.began(in_flight, timeout_s))
        began_s, supervision = time.monotonic(), self._runs.task
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
            self._record.emit("drain", drain.ended_by_itself(in_flight, waited_s))
        else:
            self._record.emit("drain", drain.ended(in_flight, left, waited_s, timeout_s))

    async def _halt(self, final: State = State.STOPPED, why: str = "") -> None:
        if self._runs.active:
            served = self.state in _SAVED_FROM and self.running
            self._record.set_state(State.STOPPING)
            if final == State.STOPPED and served:  # a planned stop: not a hold, whose server lost a peer
                await self._caches.save(self.port, self.settings)
            await self._runs.cancel()
        self._record.set_state(final, why)

    def note(self, kind: str, message: str) -> None:
        """Record something that happened to the instance from outside (a hot GPU)."""
        self._record.emit(kind, message)

    def status(self, events: int = 10, requests: tuple[int, int] = (0, 0)) -> InstanceStatus:
        """What the API shows of it; ``requests``: the front door's requests in flight and queued."""
        shown = Shown(self.name, self.group, self.settings, self.port, self.placement, self.plan, self.log_path)
        parts = (self._record, self._runs, self._checker, self._download)
        return instance_status(shown, *parts, events=events, requests=requests)
