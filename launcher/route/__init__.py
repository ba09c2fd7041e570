"""The OpenAI-compatible front door: the ASGI app before the API (front.py: keys, bodies, disconnects),
routing by model with replicas, queueing, on-demand loading by VRAM and eviction (router.py), its
decisions pure (choose.py: replicas, eviction by priority, pins and resident time, collation), requests in
flight and queued (admission.py), where a model lives, here or on a peer (where.py, peer.py), the upstream
relay (proxy.py), answers naming the model asked for (naming.py), token counts (usage.py), what a request got
(served.py), request metrics (metrics.py) and OpenAI-shaped errors (errors.py)."""
