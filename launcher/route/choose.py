"""The front door's decisions, as pure functions of the facts passed in (no clocks; the planner's verdict
comes in as a function): which replica takes a request, which idle models make room for another (by
priority, pins and resident time) and in which order waiting models are served, and when an idle model is
due to stop. The router (launcher/route/router.py) and its on-demand loader (launcher/route/on_demand.py)
gather the facts and carry the decisions out.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from fractions import Fraction

from launcher.route.prefix_ring import pick_by_prefix


@dataclass(frozen=True)
class Replica:
    """One instance of a model as the router sees it when a request needs a home."""

    name: str
    serving: bool  # ready, and not taken out after failing a request
    in_flight: int
    limit: int  # requests in flight before the next one waits
    recent: int = 0  # requests it was given among its model's last prefix_ring.RECENT_REQUESTS
    # its share of those: 1/n of each one made while it served (n replicas serving then); admission.py counts it
    recent_share: Fraction = Fraction(0)


def pick(replicas: Sequence[Replica], turn: int, prefix: str | None = None, epsilon: float = 0.1) -> str | None:
    """With a ``prefix`` key (`routing: prefix`), `prefix_ring.pick_by_prefix`'s replica. Without, the
    replica with the fewest requests in flight that has room; among equals, round-robin: the first one at
    or after position ``turn % len(replicas)``. None when none can take a request now."""
    if not replicas:
        return None
    if prefix is not None:
        return pick_by_prefix(replicas, prefix, epsilon)
    start = turn % len(replicas)
    best: Replica | None = None
    for offset in range(len(replicas)):
        replica = replicas[(start + offset) % len(replicas)]
        if (
            replica.serving
            and replica.in_flight < replica.limit
            and (best is None or replica.in_flight < best.in_flight)
        ):
            best = replica
    return best.name if best is not None else None


@dataclass(frozen=True)
class Resident:
    """A running on-demand model, as the choice of what to stop for another sees it."""

    name: str
    last_used_s: float  # when its last request ended (or it became ready), on any monotonic clock
    busy: bool = False  # requests in flight or queued: never stopped now, perhaps once they end
    priority: int = 0
    pinned: bool = False
    resident_until_s: float = 0.0  # started on demand at t: t + min_resident_s


@dataclass(frozen=True)
class Room:
    """What to do for a model that needs room: ``stop`` these first ([]: it fits as things are); or,
    ``stop`` None, wait (``wait``: it fits once busy models are idle, or at ``retry_at_s`` when a resident
    time ends) or be refused, ``kept`` saying which models the rules keep and why. ``drain``: the busy
    models a wait needs idle, which a model that waited too long holds to no new request (else one in
    steady use kept it out until its requests timed out)."""

    stop: list[str] | None
    wait: bool = False
    retry_at_s: float | None = None
    kept: tuple[str, ...] = ()
    drain: tuple[str, ...] = ()


def make_room(
    residents: Sequence[Resident], priority: int, now_s: float, fits: Callable[[Sequence[str]], bool]
) -> Room:
    """Room for a model of ``priority`` beside ``residents``: ``fits(stopped)`` is the planner's verdict
    with those stopped. A pinned model is never stopped, nor one of higher priority; one within its
    resident time only for a higher priority, and only when idle. Of the rest, the fewest idle ones,
    lowest priority first and least recently used among equals."""

    def kept_why(r: Resident) -> str | None:
        if r.pinned:
            return f"{r.name} is pinned"
        if r.priority > priority:
            return f"{r.name} has a higher priority ({r.priority} > {priority})"
        return None

    def resident(r: Resident) -> bool:
        return now_s < r.resident_until_s and r.priority >= priority

    ranked = sorted((r for r in residents if kept_why(r) is None), key=lambda r: (r.priority, r.last_used_s))
    now = [r.name for r in ranked if not r.busy and not resident(r)]
    for count in range(len(now) + 1):
        if fits(now[:count]):
            return Room(now[:count])
    kept = tuple(why for r in residents if (why := kept_why(r)) is not None)
    kept += tuple(f"{r.name} is busy" for r in ranked if r.busy)
    kept += tuple(f"{r.name} is resident until its min_resident_s" for r in ranked if not r.busy and resident(r))
    later = [r.name for r in ranked]
    if len(later) > len(now) and fits(later):
        retry_at_s = min((r.resident_until_s for r in ranked if resident(r)), default=None)
        drain = _to_drain([r for r in ranked if not resident(r)], fits)
        return Room(None, wait=True, retry_at_s=retry_at_s, kept=kept, drain=drain)
    return Room(None, kept=kept)


def _to_drain(stoppable: Sequence[Resident], fits: Callable[[Sequence[str]], bool]) -> tuple[str, ...]:
    """The busy ones among the fewest of ``stoppable`` (in the order they would be stopped) that make room;
    none when room needs one within its resident time as well (its time's end decides again)."""
    for count in range(1, len(stoppable) + 1):
        if fits([r.name for r in stoppable[:count]]):
            return tuple(r.name for r in stoppable[:count] if r.busy)
    return ()


def collate(waiting: Sequence[str], running: Collection[str]) -> list[str]:
    """The order in which models waiting for requests are served, given each waiting request's model
    oldest first: the running ones first (their requests need no swap), then the others by their oldest
    request, so that one swap serves every queued request of a model (llama-swap's collation: ABCABC is
    served AABBCC, two swaps instead of five)."""
    order = list(dict.fromkeys(waiting))
    return [m for m in order if m in running] + [m for m in order if m not in running]


@dataclass(frozen=True)
class Use:
    """A running model with an idle_ttl_s, as the idle timer sees it."""

    name: str
    idle_ttl_s: float
    busy: bool  # requests in flight or queued
    last_used_s: float  # when its last request ended (or it became ready)


def expired(uses: Sequence[Use], now_s: float) -> tuple[list[str], float | None]:
    """The models whose idle time is up at ``now_s``, and when the next one will be (None: none waits)."""
    due = [u.name for u in uses if not u.busy and u.last_used_s + u.idle_ttl_s <= now_s]
    later = [u.last_used_s + u.idle_ttl_s for u in uses if not u.busy and u.name not in due]
    return due, min(later, default=None)
