"""The OpenAI-compatible front door: the ASGI door before the API (front.py), routing by model with
replicas, queueing, on-demand loading by VRAM and eviction (router.py; its decisions pure in choose.py, in
flight and queued in lanes.py), where a model lives, here or on a peer (where.py, peer.py), the upstream
relay (proxy.py), token counts (usage.py), request records (served.py), metrics and errors."""
