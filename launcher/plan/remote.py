"""Planning over peers' RPC devices: which endpoints a model may use, the search across hosts, and what a
split across hosts sends over the network.

An endpoint (one rpc-server) is the unit: llama-server uses every device a server it is given exposes,
and a server serves one llama-server at a time, so an endpoint another holder claimed, or one a client
holds without a claim, is left out. llama.cpp orders devices as the `--rpc` servers' devices (in the
order given, each server's in its order), then this host's GPUs (src/llama.cpp, "add RPC servers at the
front of the list to minimize network transfers"): the layout, the tensor split and the network cost
follow that order.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from launcher.plan.estimate import ModelShape, Runtime
from launcher.plan.layout import LOCAL, Layout, UsableGpu, balanced
from launcher.schema_plans import NetworkCost
from launcher.schema_rpc import PeerStatus, RpcEndpoint

_F32_B = 4  # activations and logits cross as f32


@dataclass(frozen=True)
class Endpoint:
    """A peer's rpc-server this instance may use: its devices as usable GPUs, in the server's order."""

    host: str
    address: str
    gpus: tuple[UsableGpu, ...]

    @property
    def usable_mib(self) -> int:
        return sum(r.usable_mib for r in self.gpus)


@dataclass(frozen=True)
class Remote:
    """What peers lend this instance, and why the endpoints left out are."""

    endpoints: tuple[Endpoint, ...] = ()
    left_out: tuple[str, ...] = ()


NO_REMOTE = Remote()  # `hosts: local`, or no peers


def remote_for(peers: Sequence[PeerStatus], hosts: str | Sequence[str], holder: str) -> Remote:
    """The endpoints of ``peers`` that `hosts:` allows and that are free for ``holder`` (an endpoint it
    already claims is free for it, with its own claim counted as usable again)."""
    if hosts == "local":
        return NO_REMOTE
    endpoints, left_out = [], []
    for peer in peers:
        if hosts != "auto" and peer.name not in hosts and peer.url not in hosts:
            continue
        if not peer.reachable:
            left_out.append(f"peer {peer.name} is not reachable ({peer.error})")
            continue
        for endpoint in peer.endpoints:
            why = _busy(endpoint, holder)
            if why is not None:
                left_out.append(f"{peer.name} {endpoint.endpoint}: {why}")
                continue
            ours = {c.gpu: c.memory_mib for c in endpoint.claims if c.holder == holder}
            gpus = tuple(
                UsableGpu(
                    d.gpu,
                    d.uuid,
                    d.name,
                    d.memory_total_mib or 0,
                    max(0, (d.usable_mib or 0) + ours.get(d.gpu, 0)),
                    host=peer.name,
                    endpoint=endpoint.endpoint,
                )
                for d in endpoint.devices
            )
            endpoints.append(Endpoint(peer.name, endpoint.endpoint, gpus))
    return Remote(tuple(endpoints), tuple(left_out))


def _busy(endpoint: RpcEndpoint, holder: str) -> str | None:
    others = sorted({c.holder for c in endpoint.claims if c.holder != holder})
    if others:
        return f"claimed by {', '.join(others)}"
    if endpoint.clients and not endpoint.claims:
        return f"a client is attached ({', '.join(endpoint.clients)}) and it serves one at a time"
    if endpoint.server_devices != len(endpoint.devices):
        return (
            f"lends {len(endpoint.devices)} GPU(s) but its server reports {endpoint.server_devices} device(s): "
            "which is which is unknown"
        )
    if any(d.usable_mib is None for d in endpoint.devices):
        return "a lent GPU cannot be read"
    return None


def across_hosts(
    shape: ModelShape, runtime: Runtime, local: Sequence[UsableGpu], remote: Remote, overhead_b: int
) -> Layout | None:
    """Full offload over this host's GPUs and the fewest peers, then the fewest endpoints of those peers
    (the most usable memory first): the first set on which every device takes a share. This host's usable GPUs
    are all used (what stays here is what does not cross the network); it is called when they alone do
    not hold the model."""
    local = [r for r in local if r.usable_mib > 0]
    by_host: dict[str, list[Endpoint]] = {}
    for endpoint in remote.endpoints:
        by_host.setdefault(endpoint.host, []).append(endpoint)
    for count in range(1, len(by_host) + 1):
        combos = sorted(
            itertools.combinations(by_host, count), key=lambda c: -sum(e.usable_mib for h in c for e in by_host[h])
        )
        for combo in combos:
            offered = [e for h in combo for e in by_host[h]]
            for size in range(count, len(offered) + 1):
                sets = [s for s in itertools.combinations(offered, size) if {e.host for e in s} == set(combo)]
                sets.sort(key=lambda s: -sum(e.usable_mib for e in s))
                for chosen in sets:
                    gpus = [gpu for e in chosen for gpu in e.gpus] + local
                    found = balanced(shape, runtime, gpus, shape.n_layer + 1, overhead_b)
                    # Every device of a chosen server is one of llama-server's: each needs its entry.
                    remote_gpus = sum(len(e.gpus) for e in chosen)
                    if found is not None and sum(1 for d in found.devices if d.endpoint) == remote_gpus:
                        return found
    return None


def network_cost(shape: ModelShape, layout: Layout) -> NetworkCost | None:
    """Bytes over the network per token of a layer split; None when every device is local.

    The token embeddings are looked up on this host, each device passes one token's activations
    (n_embd f32) to the next, and the last device's output comes back here: the logits (n_vocab f32,
    one row per generated token; a prompt's tokens need none but the last) when it holds the output
    layer, else activations for the CPU's layers. Devices of one server copy among themselves; two
    servers exchange through this host (llama.cpp's RPC copies between servers as a get and a set)."""
    if not any(d.endpoint for d in layout.devices):
        return None
    places = [LOCAL, *(d.endpoint or LOCAL for d in layout.devices)]
    crossings = 0
    for here, there in itertools.pairwise(places):
        if here != there:
            crossings += 2 if LOCAL not in (here, there) else 1
    last_remote = places[-1] != LOCAL
    full = layout.gpu_layers == shape.n_layer + 1
    activation_b = shape.n_embd * _F32_B
    per_prompt = crossings * activation_b + (activation_b if last_remote and not full else 0)
    per_generated = per_prompt + (shape.n_vocab * _F32_B if last_remote and full else 0)
    return NetworkCost(
        crossings=crossings + (1 if last_remote else 0),
        bytes_per_prompt_token=per_prompt,
        bytes_per_generated_token=per_generated,
    )
