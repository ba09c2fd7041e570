"""One instance's supervision task: its server run after run (spawned or adopted), each waited for ready,
watched by its health checks and ended, the restart policy deciding what follows each end.

The instance's requests (start, stop, restart: supervise/instance.py) begin and cancel this task; what it
runs with (settings, backend, port, placement, plan) is the instance's, read as each run needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import stat
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from launcher.backends import Health, LaunchSpec, ServerBackend
from launcher.config_model import ModelSettings
from launcher.errors import LauncherError
from launcher.plan.placement import Placement
from launcher.schema_instances import State
from launcher.schema_plans import Plan
from launcher.statedir import logs
from launcher.supervise.leftovers import INSTANCE_ENV
from launcher.supervise.parts import DaemonParts
from launcher.supervise.plan_check import PlanChecker
from launcher.supervise.policy import RestartPolicy, StartFailure
from launcher.supervise.process import ExitStatus, ServerProcess
from launcher.supervise.prompt_caches import PromptCaches
from launcher.supervise.record import EVENTS_KEPT, InstanceRecord
from launcher.supervise.server_errors import server_error

log = logging.getLogger("launcher")

_FIRST_LOAD_PROBE_S = 0.01  # a tiny model is ready in 50 ms; big ones back off to _MAX
_MAX_LOAD_PROBE_S = 0.5
LOG_LINES_READ = 200  # of a server that ended: where its last error lines are looked for
_LINES_AT_THE_END = 20  # of a server that served before it ended: where why it ended is looked for


class Supervised(Protocol):
    """What the runs read of their instance (supervise/instance.py) as each run needs it."""

    name: str
    log_path: Path
    settings: ModelSettings
    backend: ServerBackend
    port: int | None
    placement: Placement
    plan: Plan | None

    @property
    def retired(self) -> str | None: ...

    def preflight(self) -> LaunchSpec: ...


class ServerRuns:
    def __init__(
        self,
        instance: Supervised,
        *,
        parts: DaemonParts,
        record: InstanceRecord,
        policy: RestartPolicy,
        caches: PromptCaches,
        checker: PlanChecker,
    ) -> None:
        """``instance``: whose server it runs, read, never written; ``policy``: the instance's, which a
        reload's settings change."""
        self._instance = instance
        self._parts = parts
        self._record = record
        self._policy = policy
        self._caches = caches
        self._checker = checker
        self._task: asyncio.Task[None] | None = None
        self._proc: ServerProcess | None = None
        self._ready_since: float | None = None
        self.spec: LaunchSpec | None = None  # the command line and environment of the current (or last) run
        self.restarts = 0
        self.last_exit: ExitStatus | None = None
        # What the server said as its last runs ended (in last_error and exit events): shown to the holder
        # of the API token alone, as its log is (launcher/api/redact.py).
        self.server_words: deque[str] = deque(maxlen=EVENTS_KEPT)
        self.server_info: dict[str, int] = {}  # what the server reports of itself (Ollama: sizes)
        self._last_notice: str | None = None

    @property
    def process(self) -> ServerProcess | None:
        """The server process of the current or last run, until it is ended."""
        return self._proc

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    @property
    def active(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def ready_for_s(self) -> float | None:
        return None if self._ready_since is None else time.monotonic() - self._ready_since

    def begin(self, spec: LaunchSpec, adopted: ServerProcess | None = None) -> None:
        """Supervise from now on, the first run with ``spec`` (the start's, checked as it was asked for), or
        the ``adopted`` server, already running with it."""
        self._policy.reset()
        self._record.keep_error(None)
        self.spec = spec
        self._record.set_state(State.STARTING)  # the answer to a start request already says so
        self._task = asyncio.create_task(self._supervise(spec, adopted), name=f"supervise:{self._instance.name}")
        self._task.add_done_callback(self._supervision_ended)

    async def cancel(self) -> None:
        """End the supervision task, its server stopped by the task itself."""
        task = self._task
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([task])  # an error it ended by is `_supervision_ended`'s to record

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
                if self._instance.retired is not None:  # no new server for a retired instance
                    self._record.set_state(State.FAILED, f"not restarted: {self._instance.retired}")
                    return
                spec, adopted = None, None  # the next run is a new start of the process: checked and computed again
                self._record.set_state(State.BACKOFF, f"restarting in {delay:.2f}s")
                await asyncio.sleep(delay)
                self.restarts += 1
        finally:
            if self._proc is not None:  # cancelled: a stop or restart was asked for
                await self._end(self._proc, " (stopped on request)")

    async def _run_raised(self, exc: Exception) -> float | None:
        """A run that raised: its server (if any) is stopped, and it counts as a failed run."""
        log.error("%s: supervision error", self._instance.name, exc_info=exc)
        self._record.record_error(f"supervision error: {type(exc).__name__}: {exc}")
        self._ready_since = None
        if self._proc is not None:
            await self._end(self._proc, "")
        return self._decide(failure=True, ready_for_s=None)

    def _supervision_ended(self, task: asyncio.Task[None]) -> None:
        """The safety net: a supervision task that ended by an error (one in stopping its server, past
        `_run_raised`) leaves the instance failed with its server killed, never claiming a state it lost."""
        if task.cancelled() or (exc := task.exception()) is None:
            return
        log.error("%s: supervision ended", self._instance.name, exc_info=exc)
        proc, self._proc, self._ready_since = self._proc, None, None
        if proc is not None:
            proc.kill()
            self._write(self._parts.registry.path, lambda: self._parts.registry.remove(proc.pid))
        self._record.record_error(f"supervision ended by an error: {type(exc).__name__}: {exc}")
        self._record.set_state(State.FAILED)

    def _write(self, what: Path, write: Callable[[], object]) -> None:
        """A write to the state directory, which must never end supervision: a failure is counted and the
        write dropped; the first failure of a streak and the write that ends it are told."""
        notice = self._parts.writes.attempt(str(what), write)
        if notice is not None:
            self._record.emit("storage", notice)

    async def _end(self, proc: ServerProcess, why: str, *, served: bool = False) -> tuple[ExitStatus, str | None]:
        """Stop the server if it still runs, and record how it ended: with the server's own error lines
        when it ended by itself (read before the launcher's exit marker goes in). Of a server that
        ``served``, its last lines alone: an error it answered a request with hours ago is not why it ended."""
        lines = [] if proc.running else logs.lines_of_last_run(self._instance.log_path, LOG_LINES_READ)
        error = server_error(lines[-_LINES_AT_THE_END:] if served else lines)
        status = await proc.stop(self._instance.settings.stop_timeout)
        self._proc = None
        self._write(self._parts.registry.path, lambda: self._parts.registry.remove(proc.pid))
        if self._instance.placement.claims_mib:
            self._parts.vram.vacated(self._instance.placement.claims_mib)
        self.last_exit = status
        if error is not None:
            self.server_words.append(error)
            self._record.keep_error(error)
        self._write(
            self._instance.log_path,
            lambda: logs.write_marker(self._instance.log_path, f"{self._instance.name} {status.describe()}{why}"),
        )
        self._record.emit("exit", f"server {status.describe()}{why}" + (f": {error}" if error else ""))
        return status, error

    async def _run_once(self, spec: LaunchSpec | None) -> float | None:
        """Run the server once, until it ends; return the delay before the next start or None. ``spec``:
        the command of a start asked for; None after a restart by the policy, which checks again."""
        if self._record.state != State.STARTING:
            self._record.set_state(State.STARTING)
        if spec is None:
            try:
                spec = self.spec = self._instance.preflight()
            except LauncherError as exc:
                self._record.record_error(exc.message)
                return self._decide(failure=True, ready_for_s=None)
        if self._instance.placement.claims_mib:
            await self._parts.vram.await_vram(self._instance.placement.claims_mib, self._instance.name)
        self._rotate_log()
        self._checker.forget()
        marker = f"{self._instance.name} (restart {self.restarts}): {' '.join(spec.argv)}"
        self._write(self._instance.log_path, lambda: logs.write_start_marker(self._instance.log_path, marker))
        # The instance's name in the environment: how a later daemon recognises a leftover as ours.
        proc = self._proc = await ServerProcess.spawn(
            replace(spec, env={**spec.env, INSTANCE_ENV: self._instance.name}), self._instance.log_path
        )
        argv0 = spec.argv[0]
        self._write(self._parts.registry.path, lambda: self._parts.registry.add(self._instance.name, proc.pid, argv0))
        self._record.set_state(State.LOADING, f"pid {proc.pid} on port {self._instance.port}")
        ready = await self._await_ready(proc)
        if ready:  # before it is marked ready: its first request finds the prompts a planned stop saved
            await self._caches.restore(self._instance.port, self._instance.settings)
            # A cache file can kill the server as it reads it: then it never was ready (marked so, the front
            # door gave the requests that waited for it to a dead server, each a 502).
            ready = proc.alive
        return await self._run_until_end(proc, spec, ready=ready)

    async def _run_adopted(self, proc: ServerProcess, spec: LaunchSpec) -> float | None:
        """Run an adopted server (see `Instance.adopt`) until it ends, as `_run_once` runs one it spawned."""
        self._proc = proc
        self._record.set_state(
            State.LOADING, f"pid {proc.pid} on port {self._instance.port}, taken over from the previous program"
        )
        return await self._run_until_end(proc, spec, ready=True)

    async def _run_until_end(self, proc: ServerProcess, spec: LaunchSpec, *, ready: bool) -> float | None:
        """Serve with ``proc`` (``ready``, or not within its load timeout) until it ends; the delay before
        the next start or None."""
        instance, blocked = self._instance, self._parts.blocked
        unhealthy = False
        ready_for_s: float | None = None
        if ready:
            self._ready_since = time.monotonic()
            self._record.set_state(State.READY)
            await self._checker.check(instance.plan, instance.backend, instance.settings, self.spec, proc.pid)
            unhealthy = await self._watch(proc)
            ready_for_s = time.monotonic() - self._ready_since
            self._ready_since = None
        elif proc.alive:  # not one that died meanwhile (still to be reaped): its exit says why
            self._record.record_error(f"not ready within load_timeout ({instance.settings.health.load_timeout:g}s)")
        status, error = await self._end(proc, "", served=ready_for_s is not None)
        if self._record.state == State.DRAINING:  # it ended by itself while a planned stop waited for its requests:
            # that stop ends it; a restart by the policy would make a server the stop then cuts
            ended = State.STOPPED if status.success and not unhealthy else State.FAILED
            self._record.set_state(ended, "it ended during its drain: not restarted, a stop was under way")
            return None
        reason = None if blocked is None else await blocked.blocked(instance.name, instance.plan)
        if reason is not None:  # not the server's fault: no restart (and none of the policy's budget)
            self._record.set_state(State.DEGRADED, reason)
            return None
        # A server that ended by itself before it was ready, saying what it said last time with the same
        # command and files: it will say it again, so retrying only delays the news.
        start_failure = None
        if ready_for_s is None and error is not None:
            start_failure = StartFailure(error, _start_inputs(spec.argv, spec.env))
        if self._policy.repeats(start_failure):
            self._record.set_state(State.FAILED, "it failed to start twice in a row with the same error: not retried")
            return None
        failure = unhealthy or not status.success or ready_for_s is None
        return self._decide(failure=failure, ready_for_s=ready_for_s, said=error)

    def _decide(self, *, failure: bool, ready_for_s: float | None, said: str | None = None) -> float | None:
        """What the policy makes of a run's end; ``said``: the server's words as it ended, kept first in the
        error when the policy gives up."""
        delay = self._policy.next_delay(failure=failure, ready_for_s=ready_for_s, now=time.monotonic())
        if delay is None:
            if failure and self._instance.settings.restart.policy != "never":
                gave_up = (
                    f"gave up after more than {self._instance.settings.restart.burst} restarts "
                    f"in {self._instance.settings.restart.interval:g}s"
                )
                self._record.record_error(gave_up if said is None else f"{said} ({gave_up})")
            self._record.set_state(State.FAILED if failure else State.STOPPED)
        return delay

    async def _await_ready(self, proc: ServerProcess) -> bool:
        """Probe until ready; False when the process ended or the load timed out."""
        deadline = time.monotonic() + self._instance.settings.health.load_timeout
        interval = _FIRST_LOAD_PROBE_S
        assert self._instance.port is not None
        while proc.running:
            if await self._instance.backend.is_ready(
                self._parts.http, self._instance.port, self._instance.settings.health.timeout
            ):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.wait([proc.exited], timeout=min(interval, remaining))
            interval = min(interval * 1.5, _MAX_LOAD_PROBE_S)
        return False

    async def _watch(self, proc: ServerProcess) -> bool:
        """Watch a ready server until it ends; True when it was ended for failing its health checks."""
        health = self._instance.settings.health
        failures = 0
        assert self._instance.port is not None
        while True:
            done, _ = await asyncio.wait([proc.exited], timeout=health.interval)
            if done:
                return False
            self._rotate_log()
            found = await self._instance.backend.health(self._parts.http, self._instance.port, health.timeout)
            if found.ok:
                failures = 0
                self._take(found)
                if self._record.state == State.UNHEALTHY:
                    self._record.set_state(State.READY, "health checks pass again")
                continue
            if not proc.running:
                return False
            failures += 1
            if self._record.state != State.DRAINING:  # a draining server is on its way out, served or not
                self._record.set_state(State.UNHEALTHY, f"health check failed {failures}/{health.failures}")
            if failures >= health.failures:
                self._record.record_error(f"killed after {failures} failed health checks")
                return True

    def _rotate_log(self) -> None:
        parts = self._parts
        self._write(
            self._instance.log_path,
            lambda: logs.rotate_if_large(self._instance.log_path, parts.log_max_bytes, parts.log_keep),
        )

    def _take(self, found: Health) -> None:
        """Keep what a healthy probe reported, and tell once each new warning or reload."""
        if found.details:
            self.server_info = dict(found.details)
        notice = found.warning or ("the server dropped the model; loading it again" if found.reloading else None)
        if notice is not None and notice != self._last_notice:
            self._record.emit("warning", notice)
        self._last_notice = notice


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
