"""`launcher serve`: the API, the supervision of every instance, and a clean stop on SIGTERM/SIGINT.

uvicorn's Server installs its own SIGINT/SIGTERM handlers while serving; the app's lifespan shutdown
(which stops every server) runs in that path, so a signalled daemon leaves no server behind.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket

import uvicorn

from launcher import systemd
from launcher.api.app import create_app
from launcher.config import Settings, read_token
from launcher.errors import ConfigError, StartError
from launcher.supervise.instance import Event
from launcher.supervise.manager import Manager
from launcher.supervise.ports import port_holder

log = logging.getLogger("launcher")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
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
    sock.set_inheritable(False)
    return sock


def _log_event(event: Event) -> None:
    log.info("%s: %s: %s", event.instance, event.kind, event.message)


def serve(settings: Settings, *, autostart: bool = True) -> None:
    """Run the daemon until SIGTERM or SIGINT."""
    token = read_token(settings.daemon.token_file)
    host, port = settings.daemon.host, settings.daemon.port
    if token is None and not is_loopback(host):
        raise ConfigError(
            f"refusing to listen on {host} without an API token",
            hint="set daemon.token_file, or daemon.host: 127.0.0.1",
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sock = _bind(host, port)
    asyncio.run(_serve(settings, sock, token, autostart))


async def _serve(settings: Settings, sock: socket.socket, token: str | None, autostart: bool) -> None:
    manager = Manager(settings, on_event=_log_event)

    def started() -> None:
        log.info(
            "listening on http://%s:%d (config %s)",
            settings.daemon.host,
            settings.daemon.port,
            settings.source,
        )
        systemd.notify("READY=1\nSTATUS=serving")

    def stopping() -> None:
        log.info("stopping every instance")
        systemd.notify("STOPPING=1")

    app = create_app(manager, token=token, autostart=autostart, on_started=started, on_stopping=stopping)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    await server.serve(sockets=[sock])
