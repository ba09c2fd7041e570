"""llama.cpp's RPC backend and the peers: `ggml-rpc-server` workers that lend this host's GPUs to a
llama-server elsewhere. What an address may be bound to (address.py), the wire's handshake as a probe
(wire.py), the sockets of a worker (sockets.py), the plan of a worker's devices (plan.py) and what `GET
/rpc` reports of them (report.py), the claims peers hold here (claims.py), this daemon's view of its peers
(peers.py), planning over peers' devices (remote.py), and the verdict when a peer's endpoint goes away
(failover.py, pure)."""
