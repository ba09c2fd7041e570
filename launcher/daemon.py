"""The daemon: the REST API and the supervision of every instance, until SIGTERM or SIGINT.

`launcher serve` runs it; `launcher up` without a daemon runs the same thing in the foreground, so
`launcher status` works from another terminal either way. The daemon handles SIGTERM and SIGINT itself,
from before it owns the state directory until its last server is stopped: they end serving, and the
wiring's exit stops every server before the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable, Iterator

import uvicorn

from launcher import systemd
from launcher.api.app import create_app
from launcher.config import Settings
from launcher.errors import StartError
from launcher.schema import Event
from launcher.supervise.manager import Manager
from launcher.wiring import api_token, listen, supervision

log = logging.getLogger("launcher")

# Open `logs -f` streams must not hold the servers' shutdown up for long.
_GRACEFUL_SHUTDOWN_S = 3


class _Server(uvicorn.Server):
    """uvicorn's Server without its signal handling: the daemon installs its own (see `Daemon.run`)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Daemon:
    """The API server over the wired manager, until SIGTERM, SIGINT or `request_stop`."""

    def __init__(
        self,
        settings: Settings,
        *,
        autostart: bool,
        on_event: Callable[[Event], None] = lambda _e: None,
        on_started: Callable[[Manager], None] = lambda _m: None,
    ) -> None:
        self._settings = settings
        self._token = api_token(settings)  # a public bind without a token is refused before anything runs
        self._autostart = autostart
        self._on_event = on_event
        self._on_started = on_started
        self._server: _Server | None = None
        self._starting: asyncio.Task[None] | None = None  # the wiring's start, until the API serves

    def request_stop(self, sig: signal.Signals | None = None) -> None:
        """End serving; the wiring then stops every instance. A second SIGINT hurries the API's end. Before
        the API serves (cleaning leftovers, a first GPU reading), the start itself is cancelled."""
        if self._server is None:
            if self._starting is not None:
                self._starting.cancel()
            return
        if self._server.should_exit and sig == signal.SIGINT:
            self._server.force_exit = True
        self._server.should_exit = True

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig)
        try:
            async with supervision(self._settings, self._on_event) as wired:
                log.info("GPUs: %s", wired.gpu_backend)
                sock = listen(self._settings)  # after the lock: a second daemon is told who owns the directory
                try:
                    await self._serve(wired.manager, sock)
                finally:
                    sock.close()
                    log.info("stopping every instance")
                    systemd.notify("STOPPING=1")
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def run_until_stopped(self) -> None:
        """`run`, where a stop asked for before the API serves ends it quietly (nothing was served yet)."""
        self._starting = asyncio.ensure_future(self.run())
        with contextlib.suppress(asyncio.CancelledError):
            await self._starting

    async def _serve(self, manager: Manager, sock: socket.socket) -> None:
        async def started() -> None:
            if self._autostart:
                await manager.autostart()
            systemd.notify("READY=1\nSTATUS=serving")
            self._on_started(manager)

        app = create_app(manager, self._settings, token=self._token, on_started=started)
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S)
        self._server = _Server(config)
        self._starting = None  # from here a stop ends serving, and the wiring's exit stops every server
        await self._server.serve(sockets=[sock])
        if not self._server.started:  # the app's startup failed: uvicorn logged why and returned
            raise StartError("the daemon's API did not start", hint="see the log lines above")


def serve(settings: Settings, *, autostart: bool = True) -> None:
    """`launcher serve`: run the daemon until SIGTERM or SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health probe otherwise

    def log_event(event: Event) -> None:
        log.info("%s", event.describe())

    def started(_manager: Manager) -> None:
        log.info("listening on %s (config %s)", settings.daemon.url, settings.source)

    asyncio.run(Daemon(settings, autostart=autostart, on_event=log_event, on_started=started).run_until_stopped())
