"""`launcher doctor`'s checks of the network: ports the configuration wants that another program holds,
and RPC servers (no authentication) reachable from public addresses."""

from __future__ import annotations

import socket
from collections.abc import Iterator, Mapping

import psutil

from launcher.address import reach
from launcher.config import Settings
from launcher.doctor_findings import Finding
from launcher.supervise.ports import port_holder, port_is_free


def port_findings(settings: Settings, daemon_ports: set[int]) -> Iterator[Finding]:
    wanted = {settings.daemon.port: "the daemon (daemon.port)"}
    wanted |= {m.port: f"models.{n}.port" for n, m in settings.models.items() if isinstance(m.port, int)}
    for port, user in sorted(wanted.items()):
        if port in daemon_ports or port_is_free(port):
            continue
        holder = port_holder(port)
        yield Finding(
            "warn",
            "ports",
            f"port {port} for {user} is in use" + (f" by {holder}" if holder else ""),
            "stop that program or choose another port (port: auto picks a free one)",
        )


def rpc_exposure(
    settings: Settings, ports: Mapping[int, str], listening: Mapping[int, list[str]], interfaces: list[str]
) -> Iterator[Finding]:
    """An RPC server has no authentication: warn about a public rpc.listen (allowed by rpc.allow_public)
    and about each rpc-server port (``ports``: port -> its instance) that listens on a public address, or
    on all of them (0.0.0.0) while this host has a public one among its ``interfaces``."""
    listen = settings.rpc.listen
    if reach(listen) in ("public", "wildcard"):
        yield Finding(
            "warn",
            "rpc",
            f"rpc.listen {listen} is not a loopback or private address (rpc.allow_public is set): anyone who "
            "reaches it can use the GPUs the rpc-servers lend and read what is on them",
            "bind a private address and reach other hosts through a VPN or a private network",
        )
    public_interfaces = [a for a in interfaces if reach(a) == "public"]
    for port, name in sorted(ports.items()):
        exposed = sorted(
            {
                reached
                for address in listening.get(port, [])
                for reached in (public_interfaces if reach(address) == "wildcard" else [address])
                if reach(reached) == "public"
            }
        )
        if exposed:
            yield Finding(
                "warn",
                "rpc",
                f"the rpc-server port {port} ({name}) is reachable on the public address {', '.join(exposed)}",
                "set rpc.listen to a loopback or private address, or firewall the port",
            )


def ipv4_interfaces() -> list[str]:
    return [a.address for nic in psutil.net_if_addrs().values() for a in nic if a.family == socket.AF_INET]
