"""Where a request's `model` lives, as a pure function of the names configured here and what was last
read of the peers: this daemon's own models first (a local name or alias always wins), else the first
reachable peer whose front door lists it, else no one (404 naming every model there is)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from launcher.route.errors import RouteError
from launcher.schema_front_door import ServedModel
from launcher.schema_rpc import PeerStatus

PEER_RETRY_S = 5  # Retry-After for a peer that does not answer: about one beat of its reads


@dataclass(frozen=True)
class Local:
    model: str  # the configured model here


@dataclass(frozen=True)
class OnPeer:
    peer: str
    model: str  # the peer's own name for it (an alias resolved), for the record


def peer_models(local: Mapping[str, str], peers: Sequence[PeerStatus]) -> dict[str, tuple[PeerStatus, ServedModel]]:
    """Every name a peer serves that no local one shadows, with the peer a request for it goes to: the
    first reachable one listing it, else (so that the request hears why) the first one listing it."""
    chosen: dict[str, tuple[PeerStatus, ServedModel]] = {}
    for peer in sorted(peers, key=lambda p: not p.reachable):  # stable: the configured order within each
        for model in peer.models:
            if model.id not in local:
                chosen.setdefault(model.id, (peer, model))
    return chosen


def where(name: str, local: Mapping[str, str], peers: Sequence[PeerStatus]) -> Local | OnPeer:
    """``local``: each local name and alias -> its configured model. Raises RouteError: 503 when only an
    unreachable peer lists ``name``, 404 when no one does."""
    if name in local:
        return Local(local[name])
    remote = peer_models(local, peers)
    if name in remote:
        peer, model = remote[name]
        if peer.reachable:
            return OnPeer(peer.name, model.alias_of or model.id)
        why = f"{name} is served by peer {peer.name}, which is not reachable ({peer.error})"
        raise RouteError(503, why, "peer_unreachable", retry_after_s=PEER_RETRY_S)
    known = ", ".join(sorted({*local, *(n for n, (p, _m) in remote.items() if p.reachable)})) or "none"
    raise RouteError(404, f"no model named {name!r}; known: {known}", "model_not_found")
