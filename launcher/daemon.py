"""The daemon: the REST API and the supervision of every instance, until SIGTERM or SIGINT.

`launcher serve` runs it; `launcher up` without a daemon runs the same thing in the foreground, so
`launcher status` works from another terminal either way. The daemon handles SIGTERM and SIGINT itself:
they end serving, and the app's lifespan shutdown stops every server before the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
from collections.abc import Callable, Iterator

import uvicorn

from launcher import systemd
from launcher.api.app import create_app
from launcher.config import Settings, read_token
from launcher.errors import ConfigError, StartError
from launcher.gpu.sampler import open_sampler
from launcher.supervise.instance import Event
from launcher.supervise.manager import Manager
from launcher.supervise.ports import port_holder

log = logging.getLogger("launcher")

# Open `logs -f` streams must not hold the servers' shutdown up for long.
_GRACEFUL_SHUTDOWN_S = 3


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(settings: Settings) -> tuple[socket.socket, str | None]:
    """The API's listening socket and token, or the reason the daemon must not listen."""
    host, port = settings.daemon.host, settings.daemon.port
    token = read_token(settings.daemon.token_file)
    if token is None and not is_loopback(host):
        raise ConfigError(
            f"refusing to listen on {host} without an API token",
            hint="set daemon.token_file, or daemon.host: 127.0.0.1",
        )
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
    return sock, token


class _Server(uvicorn.Server):
    """uvicorn's Server without its signal handling: the daemon installs its own (see `Daemon.run`)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Daemon:
    """The API server and the manager's lifecycle, until SIGTERM, SIGINT or `request_stop`."""

    def __init__(
        self,
        manager: Manager,
        sock: socket.socket,
        token: str | None,
        *,
        autostart: bool,
        on_started: Callable[[], None] = lambda: None,
    ) -> None:
        def started() -> None:
            systemd.notify("READY=1\nSTATUS=serving")
            on_started()

        def stopping() -> None:
            log.info("stopping every instance")
            systemd.notify("STOPPING=1")

        app = create_app(manager, token=token, autostart=autostart, on_started=started, on_stopping=stopping)
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S)
        self._server = _Server(config)
        self._sock = sock

    def request_stop(self, sig: signal.Signals | None = None) -> None:
        """End serving; the lifespan shutdown then stops every instance. A second SIGINT hurries it."""
        if self._server.should_exit and sig == signal.SIGINT:
            self._server.force_exit = True
        self._server.should_exit = True

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig)
        try:
            await self._server.serve(sockets=[self._sock])
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)


def open_manager(settings: Settings, on_event: Callable[[Event], None]) -> tuple[Manager, str]:
    """The manager with the GPU sampler the configuration asks for, and which GPU backend and why."""
    sampler, reason = open_sampler(settings)
    return Manager(settings, sampler=sampler, on_event=on_event), reason


def serve(settings: Settings, *, autostart: bool = True) -> None:
    """`launcher serve`: run the daemon until SIGTERM or SIGINT."""
    sock, token = listen(settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health probe otherwise

    def log_event(event: Event) -> None:
        log.info("%s", event.describe())

    def started() -> None:
        host, port = settings.daemon.host, settings.daemon.port
        log.info("listening on http://%s:%d (config %s)", host, port, settings.source)

    async def main() -> None:
        manager, gpus = open_manager(settings, log_event)
        log.info("GPUs: %s", gpus)
        await Daemon(manager, sock, token, autostart=autostart, on_started=started).run()

    asyncio.run(main())
