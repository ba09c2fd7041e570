"""The daemon: the REST API and the supervision of every instance, until SIGTERM or SIGINT.

`launcher serve` runs it; `launcher up` without a daemon runs the same thing in the foreground, so
`launcher status` works from another terminal either way. The daemon handles SIGTERM and SIGINT itself,
from before it owns the state directory until its last server is stopped: they end serving, and the
wiring's exit stops every server before the process exits. SIGHUP, the usual ask to reload, reloads the
configuration as `POST /config/reload` does (launcher/reloading.py) and logs what it did, or why it
changed nothing; in the foreground it means the terminal went away, and ends serving like SIGTERM.
SIGUSR2, like `POST /daemon/upgrade`, upgrades the daemon in place: a bridge answers meanwhile
(launcher/bridge.py), the requests in flight through the front door finish, then the installed program is
executed again in this process and takes over the running servers and the listening socket
(launcher/upgrade.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator

import uvicorn

from launcher import config_watch, daemon_notify, upgrade, upgrade_bridge
from launcher.api.app import create_app
from launcher.api.limits import limited_protocol
from launcher.api.stream_closer import StreamCloser
from launcher.bridge import stop_accepting
from launcher.config import Settings
from launcher.config_model import ModelSettings
from launcher.errors import ConflictError, LauncherError, StartError
from launcher.reloading import Reloader
from launcher.route.front import FrontDoor
from launcher.schema_instances import Event
from launcher.schema_reload import UpgradeStarted
from launcher.supervise.manager import Manager
from launcher.systemd import JournalFormatter, Notifier, under_journal
from launcher.wiring import Wired, api_token, front_door, listen, router_keys, supervision

log = logging.getLogger("launcher")

# Open `logs -f` streams must not hold the servers' shutdown up for long.
_GRACEFUL_SHUTDOWN_S = 3
# Why a reload or an act on an instance is refused while the upgrade drains: the exec would cut it part-way.
_UPGRADING = "an upgrade is under way"


def longest_stop_s(models: Iterable[ModelSettings]) -> float:
    """The longest the daemon's own stop may take (SIGTERM): every server drains at once, the API ends,
    every server stops at once. What a service manager's stop timeout must exceed (the units' TimeoutStopSec,
    Kubernetes' grace period, the containers' stop timeout)."""
    listed = list(models)
    stop_s = max((m.stop_timeout for m in listed), default=0.0)
    return upgrade_bridge.longest_drain_s(listed) + _GRACEFUL_SHUTDOWN_S + stop_s


class _Server(uvicorn.Server):
    """uvicorn's Server without its signal handling (the daemon installs its own, see `Daemon.run`), which
    calls ``on_serving`` once it accepts."""

    def __init__(self, config: uvicorn.Config, on_serving: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_serving = on_serving

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self._on_serving()


class Daemon:
    """The API server over the wired manager, until SIGTERM, SIGINT or `request_stop`."""

    def __init__(
        self,
        settings: Settings,
        *,
        autostart: bool,
        on_event: Callable[[Event], None] = lambda _e: None,
        on_started: Callable[[Manager], None] = lambda _m: None,
        hangup_stops: bool = False,
    ) -> None:
        self._settings = settings
        self._token = api_token(settings)  # a public bind without a token is refused before anything runs
        self._autostart = autostart
        self._on_event = on_event
        self._on_started = on_started
        self._hangup_stops = hangup_stops
        self._hangup_while_starting = False  # a SIGHUP came before the daemon could reload
        self._server: _Server | None = None
        self._starting: asyncio.Task[None] | None = None  # the wiring's start, until the API serves
        self._notifier = Notifier.from_environment()
        self._waiting: asyncio.Task[None] | None = None  # READY=1 once loaded (daemon.ready_when)
        self._reloader: Reloader | None = None  # once wired
        self._manager: Manager | None = None  # once wired
        self._reloads: set[asyncio.Task[None]] = set()  # reloads asked for by SIGHUP
        self._stop_asked = asyncio.Event()  # the servers drain, then the API ends (see `_serve`)
        self._upgrading = False  # the API ends for an upgrade: the program is executed again (`_hand_over`)
        self._served = False  # the API served once: a second time is after a failed upgrade
        self._program_started_at = time.time()
        self._watching: config_watch.Watching | None = None  # daemon.watch_config's watcher, while the daemon serves
        self._door: FrontDoor | None = None  # the front door of the API serving now
        self._streams: StreamCloser | None = None  # which ends the open streams of the API serving now
        self._keys = router_keys(settings, self._token)  # the front door's, those of the last reload
        self._ending_for_upgrade: asyncio.Task[None] | None = None
        self._bridge: subprocess.Popen[bytes] | None = None  # answering while the upgrade's program starts
        self._handed_bridge = upgrade_bridge.handed()  # the bridge of the upgrade that ran this program
        self._bridge_ending: asyncio.Task[None] | None = None  # its end: an upgrade waits for it
        self._sock: socket.socket | None = None  # the listening socket, once wired

    def request_stop(self, sig: signal.Signals | None = None) -> None:
        """End serving: every server drains (the front door's requests in flight finish, new ones wait),
        then the API ends and the wiring stops every instance. A second SIGINT ends the API without waiting
        for the drain, a third hurries the API's end. Before the API serves (cleaning leftovers, a first
        GPU reading), the start itself is cancelled."""
        if self._server is None:
            if self._starting is not None:
                self._starting.cancel()
            return
        if self._stop_asked.is_set() and sig == signal.SIGINT:
            if self._server.should_exit:
                self._server.force_exit = True
            self._server.should_exit = True
        self._stop_asked.set()

    async def request_upgrade(self) -> UpgradeStarted:
        """Upgrade in place: the API stops accepting (connections wait in the backlog), its requests in flight
        finish (up to the models' longest drain_timeout_s), then the program is executed again. ConflictError
        when that cannot be done now."""
        why = self._cannot_upgrade_now()
        if why is None:  # read in a thread: the file, and the --help of a server binary not asked yet
            why = await asyncio.to_thread(upgrade.cannot_serve_again, self._settings.source)
            why = why or self._cannot_upgrade_now()
        if why is not None:
            raise ConflictError(f"the daemon cannot be upgraded now: {why}")
        assert self._server is not None and self._door is not None and self._streams is not None
        assert self._manager is not None and self._sock is not None and self._reloader is not None
        self._upgrading = True
        # Asked now (SIGHUP, or an API connection the old program still serves), a reload would be cut by the exec,
        # as would an act on an instance (the API refuses those while `_upgrading`).
        self._reloader.close(_UPGRADING)
        serving = self._settings, self._sock, self._keys, self._manager.instances.values()
        try:
            # It accepts before this stops accepting.
            self._bridge = await upgrade_bridge.start(*serving, self._streams)
            if self._stop_asked.is_set():  # a stop came meanwhile (this was asked through the API: not cancelled)
                raise ConflictError("the daemon cannot be upgraded now: the daemon is stopping")
        except BaseException:  # cancelled by a stop, or a bug: the daemon is not left upgrading for ever
            self._upgrading = False
            if self._bridge is not None:
                upgrade_bridge.kill(self._bridge)
                self._bridge = None
            if not self._stop_asked.is_set():
                self._reloader.reopen()
            raise
        drain_s = upgrade_bridge.longest_drain_s(self._settings.models.values())
        stop_accepting(self._server)  # new connections go to the bridge, or wait in the backlog
        ending = upgrade.end_api(self._server, self._door, self._streams, drain_s)
        self._ending_for_upgrade = asyncio.create_task(ending)
        return UpgradeStarted(pid=os.getpid(), program_started_at=self._program_started_at)

    def _cannot_upgrade_now(self) -> str | None:
        reloader, manager = self._reloader, self._manager
        return upgrade.refusal(
            foreground=self._hangup_stops,
            serving=self._server is not None and self._served,
            stopping=self._stop_asked.is_set(),
            upgrading=self._upgrading,
            bridge_ending=self._bridge_ending is not None and not self._bridge_ending.done(),
            reloading=reloader is not None and reloader.reloading,
            restarting=[] if manager is None else manager.restarting(),
        )

    def _user_signal(self) -> None:
        log.info("SIGUSR2: upgrading in place")
        task = asyncio.create_task(upgrade.asked_by_signal(self.request_upgrade))
        self._reloads.add(task)  # ended with the daemon, as SIGHUP's reloads are
        task.add_done_callback(self._reloads.discard)

    def _hand_over(self, wired: Wired, sock: socket.socket) -> bool:
        """Execute the program again, handing the servers and ``sock`` over (launcher/upgrade.py); returns
        only when that did not happen: True when it failed (the daemon serves on as it was), False when a
        SIGTERM or SIGINT came meanwhile (it stops)."""
        outcome, self._bridge = upgrade.hand_over(wired, sock, self._notifier, self._bridge), None
        self._upgrading = False
        if isinstance(outcome, upgrade.StopAsked):
            log.warning("upgrade: %s came during the hand-over: stopping instead", outcome.signal.name)
            self._stop_asked.set()
            return False
        log.error("upgrade: %s; serving on with the running program", outcome.strerror or outcome)
        if self._reloader is not None:
            self._reloader.reopen()
        return True

    def _close(self, wired: Wired, reloader: Reloader | None) -> None:
        """The daemon begins to stop: the front door gives no instance a new request (new and queued ones
        hear why), no instance starts (a start or a reload's restart under way included), no reload runs
        (the watcher and SIGHUP's are cancelled, the API's refused), so that the stop keeps to
        `longest_stop_s`: the drain, then the servers' stop. An upgrade's bridge stops answering: it would
        say the servers are healthy, and send them new requests, through their drain."""
        reason = "the daemon is stopping"
        if self._bridge is not None:  # an upgrade's: its health and its /v1 are the servers' before the stop
            self._bridge.terminate()  # it accepts no more and finishes its requests (reaped as `run` ends)
        wired.router.close(reason)
        wired.manager.close(reason)
        if reloader is not None:
            reloader.close(reason)
        if self._watching is not None:
            self._watching.cancel()
        for task in self._reloads:
            task.cancel()

    def _hangup(self) -> None:
        if self._hangup_stops:
            log.warning("SIGHUP: the terminal went away; stopping")
            self.request_stop(signal.SIGHUP)
        elif self._stop_asked.is_set():
            log.warning("SIGHUP ignored: the daemon is stopping")
        elif self._reloader is None:  # read again once it is wired: the file may have changed since it was read
            log.info("SIGHUP: the configuration is read again once the daemon has started")
            self._hangup_while_starting = True
        else:
            log.info("SIGHUP: reloading the configuration")
            task = asyncio.create_task(self._reload(self._reloader))
            self._reloads.add(task)
            task.add_done_callback(self._reloads.discard)

    @staticmethod
    async def _reload(reloader: Reloader) -> None:
        """A reload nobody waits for: its outcome is an event (logged), its error a log line."""
        try:
            await reloader.reload()
        except LauncherError as exc:
            log.error("SIGHUP: the configuration was not reloaded: %s", exc)
        except Exception:  # a bug: the daemon serves on as it was, and the log has where it happened
            log.exception("SIGHUP: the reload failed unexpectedly")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._hangup)
        loop.add_signal_handler(signal.SIGUSR2, self._user_signal)
        upgrade.release_held_signals()  # after an upgrade: what came during the exec is handled now
        notifier = self._notifier

        def on_event(event: Event) -> None:
            self._on_event(event)
            notifier.changed()

        try:
            async with supervision(self._settings, on_event) as wired:
                log.info("GPUs: %s", wired.gpu_backend)
                self._manager = wired.manager
                self._reloader = Reloader(self._settings, wired, autostart=self._autostart)
                self._reloader.subscribe(self._use_keys)  # the API token waits for a restart: not the keys
                if self._hangup_while_starting:
                    self._hangup()
                # After the lock: a second daemon is told who owns the directory. An upgrade's is inherited.
                sock = self._sock = wired.listening or listen(self._settings)
                notifying = daemon_notify.notify(self._notifier, wired)
                watching = self._watching = config_watch.start_watching(self._settings, self._reloader)
                try:
                    while await self._serve(wired, sock):
                        for _ in range(3):  # a stop the loop has not handled yet would be lost in the exec
                            await asyncio.sleep(0)
                        if self._stop_asked.is_set() or not self._hand_over(wired, sock):
                            break
                finally:
                    if self._bridge is not None:  # an upgrade that ended in a stop
                        upgrade_bridge.kill(self._bridge)
                    sock.close()
                    self._reloader = None
                    if watching is not None:
                        await watching.stop()
                    log.info("stopping every instance")
                    for task in (notifying, self._waiting, *self._reloads):
                        if task is not None:
                            task.cancel()
                    notifier.send("STOPPING=1")
        finally:
            notifier.close()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
                loop.remove_signal_handler(sig)

    async def run_until_stopped(self) -> None:
        """`run`, where a stop asked for before the API serves ends it quietly (nothing was served yet)."""
        self._starting = asyncio.ensure_future(self.run())
        with contextlib.suppress(asyncio.CancelledError):
            await self._starting

    def _end_bridge(self) -> None:
        """The API serves: the bridge of the upgrade that ran this program stops (it finishes its requests)."""
        if self._handed_bridge is not None:  # ended with the daemon; a bridge left running dies with it
            task = self._bridge_ending = asyncio.create_task(upgrade_bridge.end(self._handed_bridge, self._settings))
            self._reloads.add(task)
            task.add_done_callback(self._reloads.discard)
        self._handed_bridge = None

    def _use_keys(self, settings: Settings) -> None:
        """Take a reload's router keys: the front door serving now from its next request, a later one (after
        an exec that failed) from its start."""
        self._keys = router_keys(settings, self._token)
        if self._door is not None:
            self._door.use_keys(self._keys)

    async def _serve(self, wired: Wired, sock: socket.socket) -> bool:
        """Serve the API on ``sock`` until a stop or an upgrade; True for an upgrade. uvicorn closes the
        socket it serves as it ends: it gets a duplicate, and ``sock`` keeps listening meanwhile."""
        manager = wired.manager

        async def started() -> None:
            if self._served:  # again, after a failed upgrade: everything runs as it did
                self._notifier.ready()
                return
            self._served = True
            await manager.start_each([*(manager.autostart_names() if self._autostart else []), *wired.start_again])
            if self._settings.daemon.ready_when == "loaded" and self._autostart:
                self._waiting = asyncio.create_task(daemon_notify.ready_when_loaded(self._notifier, wired))
            else:
                self._notifier.ready()
            self._on_started(manager)

        reloader = self._reloader
        reload = None if reloader is None else (lambda dry_run: reloader.reload(dry_run=dry_run))
        api = create_app(
            self._settings,
            wired,
            token=self._token,
            on_started=started,
            reload=reload,
            upgrade=self.request_upgrade,
            program_started_at=self._program_started_at,
            acts_refused=lambda: _UPGRADING if self._upgrading else None,
        )
        streams = self._streams = StreamCloser(api)
        door = self._door = FrontDoor(streams, wired.router, self._keys)
        app = front_door(door, self._settings)
        config = uvicorn.Config(
            app,
            http=limited_protocol(self._settings.daemon.request_timeout_s),
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
        )
        server = self._server = _Server(config, self._end_bridge)
        self._starting = None  # from here a stop ends serving, and the wiring's exit stops every server

        async def drain_then_exit() -> None:
            await self._stop_asked.wait()
            try:
                self._close(wired, reloader)
                await manager.drain_all()  # the API still answers meanwhile: the statuses say draining
            finally:  # a drain that failed must not keep the daemon from ending
                streams.close()  # the open streams end cleanly; ordinary answers finish in uvicorn's shutdown
                server.should_exit = True

        ending = asyncio.create_task(drain_then_exit(), name="drain-then-exit")
        try:
            await server.serve(sockets=[sock.dup()])
        finally:
            ending.cancel()
        if not self._server.started:  # the app's startup failed: uvicorn logged why and returned
            raise StartError("the daemon's API did not start", hint="see the log lines above")
        return self._upgrading


def serve(settings: Settings, *, autostart: bool = True) -> None:
    """`launcher serve`: run the daemon until SIGTERM or SIGINT."""
    handler = logging.StreamHandler()
    journal = under_journal(os.environ, sys.stderr.fileno())
    # Under journald no time of our own (it stamps every line), and a priority `journalctl -p` reads.
    handler.setFormatter(
        JournalFormatter() if journal else logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
    )
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    faulthandler.enable()  # a hang the watchdog aborts (SIGABRT) leaves the stack of every thread in the log
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health probe otherwise

    def log_event(event: Event) -> None:
        log.info("%s", event.describe())

    def started(_manager: Manager) -> None:
        log.info("listening on %s (config %s)", settings.daemon.url, settings.source)

    asyncio.run(Daemon(settings, autostart=autostart, on_event=log_event, on_started=started).run_until_stopped())
