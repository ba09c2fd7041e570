"""What becomes of an instance whose plan uses peers' rpc-servers when one of them goes away: a pure
verdict over the facts (the endpoints the plan uses, what the peers last said of them, HELLOs), carried
out by the manager.

A llama-server whose rpc-server went away cannot recover on its own: its weights lived in that server's
memory, and llama.cpp aborts at the next request on a dead connection. Restarting it by the restart
policy would spawn it against a dead endpoint again and again and burn the policy's burst, so it is
stopped and held `degraded` until every endpoint is back, then planned and started afresh.

An rpc-server that restarted between two reads of its peer is still listed, but the new server has no
connection from this llama-server (a llama-server holds its connections open from its load on): a read
taken after the instance became ready that shows no client is the restart seen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from launcher.schema_plans import Plan
from launcher.schema_rpc import PeerStatus, RpcEndpoint


class Act(StrEnum):
    KEEP = "keep"  # running, every endpoint there
    STOP = "stop"  # running on an endpoint that went away: stop it and wait, degraded
    WAIT = "wait"  # not running, an endpoint still away: stay degraded
    START = "start"  # not running, every endpoint back: plan and start again


@dataclass(frozen=True)
class Verdict:
    act: Act
    reason: str | None = None  # why an endpoint is away (STOP, WAIT)


def remote_endpoints(plan: Plan | None) -> tuple[tuple[str, str], ...]:
    """(peer, HOST:PORT) of each rpc-server ``plan`` uses, in its order, once each."""
    if plan is None:
        return ()
    return tuple(dict.fromkeys((d.host, d.endpoint) for d in plan.devices if d.endpoint is not None))


def judge(
    used: Sequence[tuple[str, str]],
    peers: Sequence[PeerStatus],
    holder: str,
    *,
    ready_for_s: float | None,
    hello: Mapping[str, bool] | None = None,
) -> Verdict:
    """The verdict for an instance using the endpoints ``used``: running (``ready_for_s``, how long it has
    been ready) or not (None). ``hello``: endpoints probed just now, when nothing of ours is attached."""
    by_name = {p.name: p for p in peers}
    running = ready_for_s is not None
    for host, address in used:
        why = _away(by_name.get(host), host, address, holder, ready_for_s, hello or {})
        if why is not None:
            return Verdict(Act.STOP if running else Act.WAIT, why)
    return Verdict(Act.KEEP if running else Act.START)


def _away(
    peer: PeerStatus | None,
    host: str,
    address: str,
    holder: str,
    ready_for_s: float | None,
    hello: Mapping[str, bool],
) -> str | None:
    """Why endpoint ``address`` of peer ``host`` is not usable by ``holder``; None when it is."""
    if peer is None or not peer.reachable:
        return f"peer {host} is not reachable ({peer.error if peer is not None else 'not configured'})"
    endpoint = _listed(peer.endpoints, address)
    if endpoint is None:
        return f"peer {host}'s rpc-server {address} is gone (not in its GET /rpc)"
    if hello.get(address) is False:
        return f"peer {host}'s rpc-server {address} does not answer HELLO"
    if ready_for_s is not None:
        # Only a read taken since the server became ready tells of its connection.
        read_since_ready = peer.read_s_ago is not None and peer.read_s_ago < ready_for_s
        if read_since_ready and not endpoint.clients:
            return f"peer {host}'s rpc-server {address} lost this llama-server's connection (it restarted)"
        return None
    others = sorted({c.holder for c in endpoint.claims if c.holder != holder})
    if others:
        return f"peer {host}'s rpc-server {address} is claimed by {', '.join(others)}"
    return None


def _listed(endpoints: Sequence[RpcEndpoint], address: str) -> RpcEndpoint | None:
    return next((e for e in endpoints if e.endpoint == address), None)


def retry_delay_s(attempts: int, initial_s: float, max_s: float) -> float:
    """Seconds before the next start of a degraded instance whose endpoints are back, after ``attempts``
    starts that did not make it ready: none at first, then doubling from ``initial_s`` up to ``max_s``."""
    if attempts <= 0:
        return 0.0
    return float(min(initial_s * 2 ** (attempts - 1), max_s))
