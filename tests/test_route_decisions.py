"""The front door's decisions and bookkeeping, exactly: replica choice, making room, idle expiry, token
counts read from answers, and the queue's order and bounds (no processes, no clocks)."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable, Sequence

import pytest

from launcher.config import Settings
from launcher.route import upstream_paths
from launcher.route.admission import Admission
from launcher.route.choose import Replica, Resident, Room, Use, collate, expired, make_room, pick
from launcher.route.errors import RouteError
from launcher.route.naming import StreamNaming, rename_document
from launcher.route.prefix_ring import ring_order
from launcher.route.usage import Tokens, of_body
from launcher.supervise.table import RequestLoad
from launcher.wiring import router_keys


def test_pick_least_outstanding_then_round_robin_among_equals() -> None:
    a, b, c = Replica("a", True, 2, 4), Replica("b", True, 1, 4), Replica("c", True, 1, 4)
    assert pick([a, b, c], turn=0) == "b"  # fewest in flight; b before c from position 0
    assert pick([a, b, c], turn=2) == "c"  # from position 2 c comes first among the equals
    equal = [Replica(n, True, 0, 1) for n in "xyz"]
    assert [pick(equal, t) for t in range(4)] == ["x", "y", "z", "x"]


def test_pick_skips_replicas_not_serving_or_full() -> None:
    loading, full, free = Replica("loading", False, 0, 4), Replica("full", True, 1, 1), Replica("free", True, 3, 4)
    assert pick([loading, full, free], turn=0) == "free"
    assert pick([loading, full], turn=0) is None
    assert pick([], turn=0) is None


def test_make_room_stops_the_fewest_least_recently_used() -> None:
    idle = [Resident("recent", 30.0), Resident("oldest", 10.0), Resident("middle", 20.0)]
    asked: list[list[str]] = []

    def fits_when_two_stopped(stopped: object) -> bool:
        asked.append(list(stopped))  # type: ignore[call-overload]
        return len(asked[-1]) >= 2

    assert make_room(idle, 0, 100.0, fits_when_two_stopped) == Room(["oldest", "middle"])
    assert asked == [[], ["oldest"], ["oldest", "middle"]]
    assert make_room(idle, 0, 100.0, lambda stopped: True) == Room([])  # fits as it is: nothing stopped
    assert make_room(idle, 0, 100.0, lambda stopped: False) == Room(None)  # never fits: none stopped, no wait


def fits_without(*needed: str) -> Callable[[Sequence[str]], bool]:
    """The planner's verdict when the new model fits once every one of ``needed`` is stopped."""
    return lambda stopped: set(needed) <= set(stopped)


def test_lower_priority_goes_first_then_lru_and_a_higher_one_is_never_stopped() -> None:
    low_recent, mid_old, high = (
        Resident("low", 50.0, priority=-1),
        Resident("mid", 10.0),
        Resident("high", 1.0, priority=5),
    )
    residents = [high, mid_old, low_recent]
    # The low one goes first though it was used last; the higher one is never offered.
    assert make_room(residents, 0, 100.0, lambda stopped: len(stopped) >= 1) == Room(["low"])
    assert make_room(residents, 0, 100.0, fits_without("low", "mid")) == Room(["low", "mid"])
    refused = make_room(residents, 0, 100.0, fits_without("high"))
    assert refused == Room(None, kept=("high has a higher priority (5 > 0)",))
    # An asker of higher priority may stop it; equal priority too (then by LRU).
    assert make_room(residents, 5, 100.0, fits_without("high")) == Room(["low", "mid", "high"])
    assert make_room(residents, 5, 100.0, lambda stopped: len(stopped) >= 1) == Room(["low"])


def test_a_pinned_model_is_never_stopped_whatever_the_askers_priority() -> None:
    pinned = Resident("pinned", 1.0, pinned=True, priority=-10)
    assert make_room([pinned], 100, 100.0, fits_without("pinned")) == Room(None, kept=("pinned is pinned",))
    other = Resident("other", 5.0)
    assert make_room([pinned, other], 0, 100.0, fits_without("other")) == Room(["other"])


def test_min_resident_time_holds_unless_idle_and_the_asker_ranks_higher() -> None:
    young = Resident("young", 90.0, resident_until_s=120.0)
    # Within its resident time an equal asker waits until it ends (then it is evictable)...
    assert make_room([young], 0, 100.0, fits_without("young")) == Room(
        None, wait=True, retry_at_s=120.0, kept=("young is resident until its min_resident_s",)
    )
    assert make_room([young], 0, 120.0, fits_without("young")) == Room(["young"])  # ...after it, stopped
    # A higher asker stops it when idle, not when busy (then it waits for it to go idle).
    assert make_room([young], 1, 100.0, fits_without("young")) == Room(["young"])
    busy = Resident("young", 90.0, busy=True, resident_until_s=120.0)
    assert make_room([busy], 1, 100.0, fits_without("young")) == Room(
        None, wait=True, kept=("young is busy",), drain=("young",)
    )


def test_a_busy_model_in_the_way_means_wait_not_refuse() -> None:
    busy, idle = Resident("busy", 1.0, busy=True), Resident("idle", 2.0)
    assert make_room([busy, idle], 0, 100.0, fits_without("busy")) == Room(
        None, wait=True, kept=("busy is busy",), drain=("busy",)
    )
    assert make_room([busy, idle], 0, 100.0, fits_without("idle")) == Room(["idle"])  # the idle one, now
    # Nothing the rules allow would make room: refused, not kept waiting.
    high = Resident("high", 1.0, busy=True, priority=1)
    assert make_room([high], 0, 100.0, fits_without("high")).wait is False


def test_a_wait_drains_only_the_busy_models_among_the_fewest_that_make_room() -> None:
    """What a model that waited too long holds to no new request: of the models it may stop, in the order it
    would stop them, the busy ones among the fewest that make room; none within a resident time."""
    old_busy, new_busy = Resident("old", 1.0, busy=True), Resident("new", 2.0, busy=True)
    idle = Resident("idle", 0.5)
    assert make_room([new_busy, old_busy], 0, 100.0, lambda stopped: len(stopped) >= 1).drain == ("old",)
    assert make_room([new_busy, old_busy], 0, 100.0, fits_without("new")).drain == ("old", "new")
    # The idle one is stopped with them, at the wait's end; it is no part of the drain.
    assert make_room([idle, new_busy], 0, 100.0, fits_without("idle", "new")).drain == ("new",)
    resident = Resident("resident", 3.0, busy=True, resident_until_s=120.0)
    waits = make_room([resident, old_busy], 0, 100.0, fits_without("old", "resident"))
    assert (waits.wait, waits.retry_at_s, waits.drain) == (True, 120.0, ())  # its time's end decides again


def swaps(served: Sequence[str]) -> int:
    """Model swaps when requests are served in this order (the first start is not a swap)."""
    return sum(1 for before, after in itertools.pairwise(served) if before != after)


def test_collation_serves_a_running_models_requests_first_then_by_oldest_request() -> None:
    assert collate(list("BACB"), running={"A"}) == ["A", "B", "C"]
    assert collate(list("BACB"), running=()) == ["B", "A", "C"]
    assert collate([], running={"A"}) == []
    # llama-swap's example: ABCABC in arrival order is five swaps first come first served, two collated.
    arrivals = list("ABCABC")
    order = collate(arrivals, running={"A"})
    collated = [request for model in order for request in arrivals if request == model]
    assert (swaps(arrivals), collated, swaps(collated)) == (5, list("AABBCC"), 2)
    # A burst of A, then B, then A again, while A runs: one swap (A to B), not one per alternation.
    burst = list("AAABBBAAA")
    assert swaps([r for m in collate(burst, running={"A"}) for r in burst if r == m]) == 1


def test_expired_idle_models_and_the_next_deadline() -> None:
    uses = [Use("old", 10.0, False, 0.0), Use("busy", 1.0, True, 0.0), Use("fresh", 10.0, False, 5.0)]
    assert expired(uses, now_s=10.0) == (["old"], 15.0)
    assert expired(uses, now_s=9.0) == ([], 10.0)
    assert expired([Use("busy", 1.0, True, 0.0)], now_s=100.0) == ([], None)


LLAMA_PLAIN = {
    "usage": {"prompt_tokens": 56, "completion_tokens": 8},
    "timings": {"prompt_n": 56, "predicted_n": 8, "predicted_per_second": 5872.5},
}


def test_tokens_of_a_plain_llama_server_answer() -> None:
    assert of_body(json.dumps(LLAMA_PLAIN).encode(), streamed=False) == Tokens(56, 8, 5872.5)


def test_tokens_of_a_stream_are_in_its_last_events() -> None:
    events = [{"choices": [{"delta": {"content": "x"}}]}] * 3 + [{"choices": [], **LLAMA_PLAIN}]
    stream = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    assert of_body(stream.encode(), streamed=True) == Tokens(56, 8, 5872.5)
    cut = stream.encode()[len(stream) // 3 :]  # the tail kept of a long stream starts mid-event
    assert of_body(cut, streamed=True) == Tokens(56, 8, 5872.5)


def test_tokens_of_ollama_and_of_answers_that_say_nothing() -> None:
    ollama = {"response": "", "done": True, "prompt_eval_count": 3, "eval_count": 5, "eval_duration": 100_000_000}
    assert of_body((json.dumps(ollama) + "\n").encode(), streamed=True) == Tokens(3, 5, 50.0)
    openai = {"usage": {"prompt_tokens": 4, "completion_tokens": 2}}
    assert of_body(json.dumps(openai).encode(), streamed=False) == Tokens(4, 2, None)
    assert of_body(b"not json", streamed=False) == Tokens()
    assert of_body(b'data: {"choices": []}\n\n', streamed=True) == Tokens()


async def test_admission_serves_in_arrival_order_and_bounds_the_queue() -> None:
    replicas = {"m": [Replica("m@0", True, 0, 1)]}
    load = RequestLoad()  # where the statuses read the counts
    admission = Admission(
        lambda model: [Replica(r.name, r.serving, admission.in_flight(r.name), r.limit) for r in replicas[model]], load
    )
    assert admission.try_take("m") == "m@0"
    assert admission.try_take("m") is None  # its one slot is taken
    first = asyncio.create_task(admission.wait("m", queue_max=2, timeout_s=5))
    second = asyncio.create_task(admission.wait("m", queue_max=2, timeout_s=5))
    await asyncio.sleep(0)  # both are queued now
    assert admission.queued("m") == 2 and load == RequestLoad(in_flight={"m@0": 1}, queued={"m": 2})
    with pytest.raises(RouteError) as full:
        await admission.wait("m", queue_max=2, timeout_s=5)
    assert (full.value.status, full.value.code, full.value.retry_after_s) == (429, "queue_full", 1)
    admission.release("m@0")
    admission.dispatch("m")
    assert await first == "m@0" and not second.done()  # the older one first
    assert admission.try_take("m") is None  # one waits: a newcomer does not jump the queue
    admission.fail("m", RouteError(503, "m stopped", "model_not_running"))
    with pytest.raises(RouteError, match="m stopped"):
        await second
    assert admission.queued("m") == 0 and admission.in_flight("m@0") == 1
    assert load == RequestLoad(in_flight={"m@0": 1}, queued={"m": 0})


async def test_a_wait_that_times_out_is_429_and_leaves_no_count_behind() -> None:
    admission = Admission(lambda model: [Replica("m@0", True, admission.in_flight("m@0"), 1)], RequestLoad())
    assert admission.try_take("m") == "m@0"
    with pytest.raises(RouteError) as late:
        await admission.wait("m", queue_max=5, timeout_s=0.01)
    assert (late.value.status, late.value.code) == (429, "queue_timeout")
    assert admission.queued("m") == 0 and admission.in_flight("m@0") == 1


async def test_a_forgotten_model_leaves_nothing_behind_and_comes_back_afresh() -> None:
    """A model a reload removes: its waits end with the error, and nothing of it is kept (its queue count,
    the replicas its recent requests went to), so models removed over a daemon's life cost nothing and one
    added back under the same name (new servers, empty caches) is routed afresh."""
    load = RequestLoad()
    names = ["m@0", "m@1"]
    admission = Admission(
        lambda model: [Replica(n, True, admission.in_flight(n), 4) for n in names], load, lambda model: 0.1
    )
    owner, other = ring_order(names, "key")
    for expected in (owner, owner, other):  # the owner's two: a third is above the bound on requests given
        assert admission.try_take("m", "key") == expected
        admission.release(expected)
    waiting = asyncio.create_task(admission.wait("m", queue_max=2, timeout_s=5, prefix="key"))
    await asyncio.sleep(0)
    admission.forget("m", RouteError(404, "m was removed from the configuration", "model_not_found"))
    with pytest.raises(RouteError, match="m was removed"):
        await waiting
    assert load == RequestLoad()  # nothing in flight, nothing queued: no entry kept for either
    assert admission.try_take("m", "key") == owner  # afresh: without the forget, the other again
    admission.release(owner)
    admission.forget("m", RouteError(404, "m was removed from the configuration", "model_not_found"))
    assert admission.try_take("m", "key") == owner


def _owners_run(admission: Admission, owner: str) -> int:
    """The requests for "key" its owner takes in a row before one spills (each released at once)."""
    for run in range(10):
        taken = admission.try_take("m", "key")
        assert taken is not None
        admission.release(taken)
        if taken != owner:
            return run
    raise AssertionError("the owner never spilled")


def _prefix_admission(limit: int) -> tuple[Admission, str]:
    names = ["m@0", "m@1"]
    admission = Admission(
        lambda model: [Replica(n, True, admission.in_flight(n), limit) for n in names], RequestLoad(), lambda _: 0.1
    )
    return admission, ring_order(names, "key")[0]


def test_a_look_at_a_server_does_not_count_against_its_share_of_the_requests() -> None:
    """`/upstream/` looks (pass-throughs without a prompt: no work for the server) leave the prefix bound as
    it was: ten of them spread over the replicas let the owner take one request more than its bound."""
    admission, owner = _prefix_admission(4)
    for _ in range(10):
        looked = admission.try_take("m", unbounded=True)
        assert looked is not None
        admission.release(looked)
    assert _owners_run(admission, owner) == 2  # as with no look at all (the forgotten model's test)
    # A pass-through with a prompt (Ollama's /api/chat through /upstream/) is work: it counts.
    admission, owner = _prefix_admission(4)
    assert admission.try_take("m", "key", unbounded=True) == owner
    admission.release(owner)
    assert _owners_run(admission, owner) == 1


async def test_a_wait_that_ended_before_its_turn_is_given_nothing_and_counts_as_no_request() -> None:
    admission, owner = _prefix_admission(1)
    other = next(n for n in ("m@0", "m@1") if n != owner)
    assert admission.try_take("m", "key") == owner
    assert admission.try_take("m", "key") == other  # the owner is full: spilled
    waiting = asyncio.create_task(admission.wait("m", queue_max=2, timeout_s=5, prefix="key"))
    await asyncio.sleep(0)  # it waits now
    waiting.cancel()  # its client left; its task has yet to take it out of the queue
    admission.release(owner)
    admission.dispatch("m")
    assert admission.in_flight(owner) == 0 and admission.queued("m") == 0
    admission.release(other)
    with pytest.raises(asyncio.CancelledError):
        await waiting
    # The owner was given one request and its share is one: it takes two more before it spills (had the
    # left one counted as given, one more).
    assert _owners_run(admission, owner) == 2


def test_route_errors_are_openai_shaped() -> None:
    error = RouteError(503, "no room", "no_room", retry_after_s=10)
    assert json.loads(error.body()) == {
        "error": {"message": "no room", "type": "unavailable_error", "param": None, "code": "no_room"}
    }
    assert (b"retry-after", b"10") in error.headers()


def test_keys_are_needed_on_a_public_bind_or_when_configured() -> None:
    def settings(host: str, keys: list[str]) -> Settings:
        return Settings.model_validate({"daemon": {"host": host}, "router": {"api_keys": keys}})

    assert router_keys(settings("127.0.0.1", []), token="admin") is None  # loopback, no keys: open
    assert router_keys(settings("127.0.0.1", ["k"]), token=None) == frozenset({"k"})
    assert router_keys(settings("0.0.0.0", []), token="admin") == frozenset({"admin"})
    assert router_keys(settings("0.0.0.0", ["k"]), token="admin") == frozenset({"k", "admin"})


def test_naming_rewrites_only_the_top_level_model_of_a_plain_answer() -> None:
    answer = b'{"choices":[{"message":{"content":"say \\"model\\":\\"x\\""}}],"model":"/srv/m.gguf","id":"c1"}'
    renamed = rename_document(answer, "chat")
    assert renamed == answer.replace(b'"model":"/srv/m.gguf"', b'"model":"chat"')  # the rest byte for byte
    spaced = b'{"model" : "/srv/m.gguf", "n": 1.50}'
    assert rename_document(spaced, "chat") == b'{"model":"chat", "n": 1.50}'
    nested_first = json.dumps({"meta": {"model": "inner"}, "model": "/srv/m.gguf"}).encode()
    assert json.loads(rename_document(nested_first, "chat")) == {"meta": {"model": "inner"}, "model": "chat"}
    for untouched in (b"not json", b'["model"]', b'{"model": 3}', b'{"other": "x"}', b"\xff\xfe"):
        assert rename_document(untouched, "chat") is untouched


def test_naming_rewrites_each_event_of_a_stream_across_chunk_boundaries() -> None:
    event = b'data: {"choices":[{"delta":{"content":"hi"}}],"model":"/srv/m.gguf"}\n\n'
    naming = StreamNaming('a "quoted" alias')
    expected = event.replace(b'"/srv/m.gguf"', json.dumps('a "quoted" alias').encode())
    assert naming.feed(event) == expected  # a whole event passes at once, rewritten
    cut = event.index(b"m.gguf")
    assert naming.feed(event[:cut]) == b""  # an event cut inside its model: held until its line ends
    assert naming.feed(event[cut:] + b": keep-alive\n\n") == expected + b": keep-alive\n\n"
    assert naming.feed(b"data: [DONE]\n\n") == b"data: [DONE]\n\n"
    assert naming.feed(b'{"model":"qwen:0.5b","done":false}') == b""  # NDJSON without its last newline
    assert naming.end() == b'{"model":"a \\"quoted\\" alias","done":false}'
    long_line = b"x" * (1024 * 1024 + 1)
    assert StreamNaming("a").feed(long_line) == long_line  # no line end for 1 MiB: passed on as it is


def test_naming_keeps_every_byte_a_parser_would_not_write_again() -> None:
    # A nested `model` sends the rename past the one-member shortcut: the rest must still be the server's
    # bytes (a lone surrogate escape cannot be encoded again, 1e400 would come back as Infinity).
    answer = b'{"model":"/m.gguf","content":"\\ud83d","x":1e400,"meta":{"model":"inner"}}'
    assert rename_document(answer, "chat") == answer.replace(b'"model":"/m.gguf"', b'"model":"chat"')
    bracket_in_text = b'{"content":"{\\"model\\": [","model":"/m.gguf","o":{"model":"k"}}'
    assert json.loads(rename_document(bracket_in_text, "chat")) == {**json.loads(bracket_in_text), "model": "chat"}


def test_naming_leaves_a_nested_model_of_a_streamed_event_alone() -> None:
    # Ollama streams a tool call's arguments as an object: a `model` argument is the client's data.
    event = b'{"model":"qwen","message":{"tool_calls":[{"function":{"arguments":{"model":"%s"}}}]},"done":false}\n'
    for argument in (b"gpt-4", b"qwen"):
        naming = StreamNaming("chat")
        renamed = json.loads(naming.feed(event % argument))
        assert renamed["model"] == "chat"
        assert renamed["message"]["tool_calls"][0]["function"]["arguments"] == {"model": argument.decode()}


def test_naming_passes_the_rest_of_an_overlong_line_unchanged() -> None:
    naming = StreamNaming("chat")
    head = b'data: {"content":"' + b"x" * (1024 * 1024)
    assert naming.feed(head) == head
    tail = b'","model":"/m.gguf"}\n'
    assert naming.feed(tail + b'data: {"model":"/m.gguf"}\n') == tail + b'data: {"model":"chat"}\n'


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/slots/0"),
        ("post", "slots"),
        ("POST", "//Slots/3"),
        ("POST", "/api/pull"),
        ("DELETE", "/api/delete"),
        ("POST", "/api/blobs/sha256:00"),
        ("PUT", "/api/create"),
    ],
)
def test_upstream_refuses_what_changes_the_servers_caches_or_store(method: str, path: str) -> None:
    why = upstream_paths.refusal(method, path)
    assert why is not None and "the launcher's own" in why


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/slots"), ("HEAD", "/api/blobs/sha256:00"), ("POST", "/completion"), ("POST", "/api/chat"),
     ("POST", "/slotsx"), ("POST", "/api/pulls")],
)  # fmt: skip
def test_upstream_passes_reads_and_work(method: str, path: str) -> None:
    assert upstream_paths.refusal(method, path) is None
