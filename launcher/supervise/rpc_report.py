"""What `GET /rpc` answers: each ready rpc-server instance of this host, with the GPUs it lends (from the
GPU sampler, with what a peer may still use of each), the connections on its port, its RPC version (from
its last HELLO) and the claims peers hold on it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from launcher.backends.rpc_server import RpcServerBackend
from launcher.rpc.claims import ClaimBook
from launcher.rpc.sockets import sockets_on
from launcher.schema_gpus import GpuSample
from launcher.schema_instances import State
from launcher.schema_rpc import RpcDevice, RpcEndpoint, RpcReport
from launcher.supervise.instance import Instance


def ready_rpc_servers(instances: Iterable[Instance]) -> dict[str, tuple[Instance, RpcServerBackend]]:
    """The ready rpc-server instances by the endpoint (HOST:PORT) they lend their GPUs at."""
    found = {}
    for instance in instances:
        backend = instance.backend
        if isinstance(backend, RpcServerBackend) and instance.state == State.READY and instance.port is not None:
            found[f"{backend.listen}:{instance.port}"] = (instance, backend)
    return found


def rpc_report(
    instances: Iterable[Instance], samples: Sequence[GpuSample], claims: ClaimBook, usable_mib: Mapping[int, int]
) -> RpcReport:
    """``usable_mib``: per GPU, what a llama-server elsewhere may use with every claim counted."""
    by_index = {s.index: s for s in samples}
    endpoints = []
    for address, (instance, backend) in ready_rpc_servers(instances).items():
        assert instance.port is not None  # ready_rpc_servers() keeps only instances with a port
        hello = backend.hellos[instance.port]  # ready: it answered a HELLO on this port
        devices = [
            RpcDevice(
                gpu=s.index,
                uuid=s.uuid,
                name=s.name,
                memory_total_mib=s.memory_total_mib,
                memory_free_mib=s.memory_free_mib,
                usable_mib=usable_mib.get(s.index),
            )
            for s in (by_index[i] for i in instance.placement.gpus if i in by_index)
        ]
        endpoints.append(
            RpcEndpoint(
                name=instance.name,
                endpoint=address,
                protocol=hello.protocol,
                server_devices=hello.devices,
                devices=devices,
                clients=sockets_on(instance.port).clients,
                claims=claims.on(address),
            )
        )
    return RpcReport(endpoints=endpoints)
