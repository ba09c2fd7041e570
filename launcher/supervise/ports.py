"""Ports: whether one is free, who holds it, and free ports for `port: auto`."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterable

import psutil

from launcher.errors import StartError


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As servers bind: connections of a stopped server lingering in TIME_WAIT do not make it busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def port_holder(port: int) -> str | None:
    """'NAME (pid N)' of the process listening on ``port``, when the system lets us see it."""
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                with contextlib.suppress(psutil.Error):
                    return f"{psutil.Process(conn.pid).name()} (pid {conn.pid})"
                return f"pid {conn.pid}"
    return None


def ensure_port_free(port: int) -> None:
    if port_is_free(port):
        return
    holder = port_holder(port)
    raise StartError(
        f"port {port} is already in use" + (f" by {holder}" if holder else ""),
        hint="stop that process, choose another port, or use port: auto",
    )


def pick_free_port(first: int, last: int, taken: Iterable[int]) -> int:
    """The lowest port of [first, last] that no instance claims and nothing listens on."""
    claimed = set(taken)
    for port in range(first, last + 1):
        if port not in claimed and port_is_free(port):
            return port
    raise StartError(
        f"no free port left in instance_ports {first}-{last}",
        hint="widen daemon.instance_ports in the configuration",
    )
