"""Prompt-cache-aware replica choice (`routing: prefix`): a request's prefix key, the start of its prompt as
the server will tokenize it, is hashed onto a ring of the model's replicas, so requests that begin alike
(a system prompt, the earlier turns of a chat, the same document) go to the replica whose prompt cache holds
them. Consistent hashing with bounded load (Mirrokni, Thorup, Zadimoghaddam 2018): a key's owner already
above (1 + ε) x the mean load passes the request on to the next replica on the ring that is under the mean,
so uneven prefixes do not pile onto one replica, and the replicas that take spills stay within
(1 + ε) / (1 - ε) of the owner whatever their number (spilling up to (1 + ε) x the mean let the first
replicas past the owner fill to that bound too, the last one on the way left with 1 - (n - 1) ε: 256/372/372
of one hot key over three at ε 0.1). Each replica has many points on the ring, so one that comes or goes
moves only its share. The load is counted twice and bounded on both: the requests in flight (a burst spreads
over the replicas) and the requests each replica was given among the model's recent ones (the totals stay
within the bound when a few prefixes carry most requests at a concurrency too low for the first bound ever
to bind), the latter against each replica's own share of those requests (1/n of each one made while it
served, n the replicas serving then), so a replica that joins, or comes back, draws no other's keys while it
catches up. Pure functions of the facts passed in.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any, Protocol


class Replica(Protocol):
    """What the ring reads of a replica (choose.Replica is one)."""

    @property
    def name(self) -> str: ...
    @property
    def serving(self) -> bool: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def limit(self) -> int: ...
    @property
    def recent(self) -> int: ...
    @property
    def recent_share(self) -> Fraction: ...


# The key is the prompt's leading messages, whole, until they hold KEY_MIN_CHARS characters, cut at
# PREFIX_CHARS (about 64 and 128 tokens of English). Whole messages: a chat's key is the same at every turn
# once its opening messages fill KEY_MIN_CHARS, where a plain cut at PREFIX_CHARS changed the key of each
# turn until the chat outgrew it (measured with bench/prefix_routing.py: a chat of a 300-character opening
# had three keys, on either replica, and its later turns recomputed the whole chat). Shorter keys send
# different prompts that share a short opening to one replica (bounded load spreads them again); longer
# ones split requests whose shared start is shorter than the key. docs/figures.md has the measurements.
KEY_MIN_CHARS = 256
PREFIX_CHARS = 512
# The requests a model's replicas were given that the second bound counts: enough that the totals of a
# run of requests stay balanced, few enough that the bound follows a change in which prefixes are asked.
RECENT_REQUESTS = 128
POINTS_PER_REPLICA = 64  # more points: each replica's share closer to 1/n, and a leaving one's spread wider


def prefix_key(doc: Any, chars: int = PREFIX_CHARS, min_chars: int = KEY_MIN_CHARS) -> str | None:
    """The start of the prompt a request body ``doc`` gives the server: its system prompt (Ollama's and
    Anthropic's `system`), then its chat `messages` in order as role and text, then a completion's
    `prompt`, taken whole until they hold ``min_chars`` characters and cut at ``chars``. None when the body
    has no prompt (an embedding, a body that is not an object). Reads no more of the body than the key
    needs (the first ``min_chars`` messages, parts or token ids; strings, cut): its cost is the key's, not
    the body's, whatever a client sends."""
    if not isinstance(doc, dict):
        return None
    parts: list[str] = []
    size = 0

    def add(text: str) -> bool:
        nonlocal size
        parts.append(text[:chars])
        size += len(text) + 1
        return size >= min_chars

    if (system := _text(doc.get("system"), chars)) and add(system):
        return _joined(parts, chars)
    messages = doc.get("messages")
    if isinstance(messages, list):
        # Each message adds at least its separator, so the first min_chars of them are all a key can hold.
        for message in messages[:min_chars]:
            if isinstance(message, dict):
                role = message.get("role")
                if add(f"{role[:chars] if isinstance(role, str) else ''}:{_text(message.get('content'), chars)}"):
                    return _joined(parts, chars)
    prompt = doc.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):  # a batch: keyed by its first
        prompt = prompt[0]
    if isinstance(prompt, list):  # token ids (llama-server's may mix in strings)
        text = ",".join(
            str(t) if isinstance(t, int) else t[:chars] for t in prompt[:chars] if isinstance(t, (int, str))
        )
    else:
        text = _text(prompt, chars)
    if text:
        add(text)
    return _joined(parts, chars) if parts else None


def _text(content: Any, chars: int) -> str:
    """A message's text, cut at ``chars``: a string, or OpenAI's list of parts (their `text`), else
    nothing."""
    if isinstance(content, str):
        return content[:chars]
    if isinstance(content, list):
        texts = (part.get("text") for part in content[:chars] if isinstance(part, dict))
        return "".join(text[:chars] for text in texts if isinstance(text, str))[:chars]
    return ""


def _joined(parts: list[str], chars: int) -> str:
    return "\n".join(parts)[:chars]


def _point(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@functools.lru_cache(maxsize=256)
def _ring(names: tuple[str, ...]) -> tuple[list[int], list[str]]:
    points = sorted((_point(f"{name}#{i}"), name) for name in names for i in range(POINTS_PER_REPLICA))
    return [p for p, _ in points], [n for _, n in points]


def ring_order(names: Sequence[str], key: str) -> list[str]:
    """``names`` in the order ``key`` meets them going round the ring from its own point."""
    points, owners = _ring(tuple(sorted(set(names))))
    start = bisect.bisect_left(points, _point(key))
    order: dict[str, None] = {}
    for offset in range(len(owners)):
        order.setdefault(owners[(start + offset) % len(owners)])
        if len(order) == len(points) // POINTS_PER_REPLICA:
            break
    return list(order)


def load_bound(loads: Sequence[int], epsilon: float) -> int:
    """The requests in flight a replica may hold before it passes the next request on: ⌈(1 + ε) x the mean
    load with this request counted⌉ (``loads``: one per serving replica)."""
    return math.ceil((1 + epsilon) * (sum(loads) + 1) / len(loads))


def share_bound(share: Fraction, serving: int, epsilon: float) -> int:
    """The recent requests a replica may have been given before it passes the next request on:
    ⌈(1 + ε) x its ``share`` of them with this request's 1/``serving`` counted⌉."""
    return math.ceil((1 + epsilon) * (share + Fraction(1, serving)))


def pick_by_prefix(replicas: Sequence[Replica], key: str, epsilon: float) -> str | None:
    """The key's owner, the first serving replica on ``key``'s way round the ring, when it has room and is
    under both load bounds at ``epsilon`` (requests in flight, requests recently given against its share);
    else the next one on the way with room, under the mean in flight and given at most its share with this
    request (a spill lifts the replicas below the mean, never fills a second one to the bound), or when none
    is, the one least above those, the owner last among equals; None when none can take a request now. The
    ring holds every replica, serving or not: one taken out or back moves only the keys that it owns."""
    serving = {r.name: r for r in replicas if r.serving}
    free = {name: r for name, r in serving.items() if r.in_flight < r.limit}
    if not free:
        return None
    in_flight = [r.in_flight for r in serving.values()]
    this_share = Fraction(1, len(serving))  # this request's part of each replica's share

    def owner_takes(replica: Replica) -> bool:
        return replica.in_flight < load_bound(in_flight, epsilon) and replica.recent < share_bound(
            replica.recent_share, len(serving), epsilon
        )

    def spill_rank(replica: Replica) -> tuple[bool, Fraction]:
        """Under the mean of those in flight first (⌈mean⌉: whole numbers), then the least above its share
        once given this request; min keeps the first on the way among equals."""
        above_share = replica.recent + 1 - replica.recent_share - this_share
        return replica.in_flight >= load_bound(in_flight, 0.0), max(above_share, Fraction(0))

    order = [name for name in ring_order([r.name for r in replicas], key) if name in serving]
    owner = free.get(order[0])
    if owner is not None and owner_takes(owner):
        return owner.name
    return min((free[name] for name in order[1:] + order[:1] if name in free), key=spill_rank).name
