"""Prompt-cache-aware replica choice (`routing: prefix`): a request's prefix key, the start of its prompt as
the server will tokenize it, is hashed onto a ring of the model's replicas, so requests that begin alike
(a system prompt, the earlier turns of a chat, the same document) go to the replica whose prompt cache holds
them. Consistent hashing with bounded load (Mirrokni, Thorup, Zadimoghaddam 2018): a replica already above
(1 + ε) x the mean load passes the request on to the next replica on the ring, so uneven prefixes do not pile
onto one replica; each replica has many points on the ring, so one that comes or goes moves only its share.
Pure functions of the facts passed in.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import math
from collections.abc import Sequence
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


# The key is the first PREFIX_CHARS characters of the rendered prompt (about 128 tokens of English). Shorter
# keys send different prompts that share a short opening to one replica (bounded load spreads them again);
# longer ones split requests whose shared start (a system prompt, a chat's opening turn) is shorter than the
# key, each replica computing it. 512 characters bounds that loss at about 128 tokens, while a system prompt
# of a few hundred tokens fills the whole key. Measured with bench/prefix_routing.py (docs/figures.md).
PREFIX_CHARS = 512
POINTS_PER_REPLICA = 64  # more points: each replica's share closer to 1/n, and a leaving one's spread wider


def prefix_key(doc: Any, chars: int = PREFIX_CHARS) -> str | None:
    """The first ``chars`` characters of the prompt a request body ``doc`` gives the server: its system
    prompt (Ollama's and Anthropic's `system`), then its chat `messages` in order as role and text, then a
    completion's `prompt`. None when the body has no prompt (an embedding, a body that is not an object)."""
    if not isinstance(doc, dict):
        return None
    parts: list[str] = []
    size = 0

    def add(text: str) -> bool:
        nonlocal size
        parts.append(text)
        size += len(text) + 1
        return size >= chars

    if (system := _text(doc.get("system"))) and add(system):
        return _joined(parts, chars)
    messages = doc.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict) and add(f"{message.get('role')}:{_text(message.get('content'))}"):
                return _joined(parts, chars)
    prompt = doc.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):  # a batch: keyed by its first
        prompt = prompt[0]
    text = ",".join(map(str, prompt[:chars])) if isinstance(prompt, list) else _text(prompt)  # token ids
    if text:
        add(text)
    return _joined(parts, chars) if parts else None


def _text(content: Any) -> str:
    """A message's text: a string, or OpenAI's list of parts (their `text`), else nothing."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
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


def load_bound(in_flight: Sequence[int], epsilon: float) -> int:
    """Requests in flight a replica may hold before it passes the next one on: ⌈(1 + ε) x the mean load
    with this request counted⌉."""
    return math.ceil((1 + epsilon) * (sum(in_flight) + 1) / len(in_flight))


def pick_by_prefix(replicas: Sequence[Replica], key: str, epsilon: float) -> str | None:
    """The first replica on ``key``'s way round the ring that serves, has room and is under the load
    bound; the least busy one with room when none is under it; None when none can take a request now. The
    ring holds every replica, serving or not: one taken out or back moves only the keys that it owns."""
    serving = [r for r in replicas if r.serving]
    free = {r.name: r for r in serving if r.in_flight < r.limit}
    if not free:
        return None
    bound = load_bound([r.in_flight for r in serving], epsilon)
    for name in ring_order([r.name for r in replicas], key):
        if name in free and free[name].in_flight < bound:
            return name
    return min(free.values(), key=lambda r: r.in_flight).name
