"""The front door's decisions and bookkeeping, exactly: replica choice, making room, idle expiry, token
counts read from answers, and the queue's order and bounds (no processes, no clocks)."""

from __future__ import annotations

import asyncio
import json

import pytest

from launcher.config import Settings
from launcher.route.admission import Admission
from launcher.route.choose import Idle, Replica, Use, expired, make_room, pick
from launcher.route.errors import RouteError
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
    idle = [Idle("recent", 30.0), Idle("oldest", 10.0), Idle("middle", 20.0)]
    asked: list[list[str]] = []

    def fits_when_two_stopped(stopped: object) -> bool:
        asked.append(list(stopped))  # type: ignore[call-overload]
        return len(asked[-1]) >= 2

    assert make_room(idle, fits_when_two_stopped) == ["oldest", "middle"]
    assert asked == [[], ["oldest"], ["oldest", "middle"]]
    assert make_room(idle, lambda stopped: True) == []  # fits as it is: nothing stopped
    assert make_room(idle, lambda stopped: False) is None  # never fits: none stopped


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
