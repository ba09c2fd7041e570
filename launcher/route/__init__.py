"""The OpenAI-compatible front door: the ASGI app before the API (front.py: keys, bodies, disconnects),
routing by model with replicas and queueing (router.py; routed.py: what it keeps of a model, taken_out.py:
replicas out until they answer again), on-demand loading by VRAM, eviction and the idle timer (on_demand.py), its
decisions pure (choose.py: replicas, eviction by priority, pins and resident time, collation), requests in
flight and queued (admission.py), where a model lives, here or on a peer (where.py, peer.py), the upstream
relay (proxy.py), answers naming the model asked for (naming.py), token counts (usage.py), what a request got
(served.py), the request records and metrics (request_log.py, metrics.py) and OpenAI-shaped errors (errors.py)."""
