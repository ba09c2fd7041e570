"""llama.cpp's RPC backend, as the wire and the peers see it: `ggml-rpc-server` workers that lend this
host's GPUs to a llama-server elsewhere. The wire's handshake as a probe (wire.py), the sockets of a
worker's port (sockets.py), the claims peers hold here (claims.py), this daemon's view of its peers
(peers.py), and the verdict when a peer's endpoint goes away (failover.py, pure). Planning over peers'
devices is in launcher/plan/ (lending.py, remote.py), what `GET /rpc` reports in
launcher/supervise/rpc_report.py, and where a worker may listen in launcher/address.py."""
