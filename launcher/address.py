"""Who can reach a listening address: the daemon's API (a token is required off loopback) and an RPC
server, which has no authentication and hands out its GPUs' memory to anyone who connects (llama.cpp:
"never run the RPC server on an open network"), so only loopback and private networks are allowed for it
without saying so. Standard library only: the configuration imports it."""

from __future__ import annotations

import ipaddress
from typing import Literal

Reach = Literal["loopback", "private", "public", "wildcard"]

# RFC 1918, and RFC 6598's shared space: the addresses overlay VPNs (Tailscale, Headscale) hand out.
_PRIVATE = tuple(ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"))


def reach(address: str) -> Reach:
    """Who can connect to a server bound to ``address``, an IPv4 address (ggml-rpc-server binds IPv4 only).
    ValueError when it is not one."""
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        raise ValueError(f"{address!r} is not an IPv4 address (ggml-rpc-server binds IPv4 addresses only)") from None
    if ip.is_unspecified:
        return "wildcard"
    if ip.is_loopback:
        return "loopback"
    return "private" if any(ip in network for network in _PRIVATE) else "public"


def is_loopback(host: str) -> bool:
    """Whether a server bound to ``host`` (a name or an IPv4 or IPv6 address) is reachable from this
    machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
