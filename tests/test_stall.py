"""Stuck slots (launcher/route/stall.py): the decision from successive `/slots` readings and the time of the
answer's last byte, exactly; and on a real daemon, the llama-server stand-in that takes a request and goes
silent while its `/health` answers: a 504 in OpenAI's shape (an error event in a stream begun), an event,
and after `stall_failures` stalls a new server; a long prompt being processed is not cut.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest
from starlette.types import Message, Send

from launcher.config_supervision import HealthSettings
from launcher.events import Bus
from launcher.route.proxy import Answer
from launcher.route.stall import Reading, Stalled, StallWatch, busy_slots, describe, stalled
from launcher.schema_instances import Event
from tests.conftest import ConfigWriter, Daemon, poll_until
from tests.test_front_door import CHAT, error_of, event_messages

StartDaemon = Callable[[Path], Daemon]
STUCK = {0: (7, 1, 3)}


# ---- the decision -----------------------------------------------------------------------------------------


def test_no_byte_and_unchanged_slots_for_stall_s_is_a_stall() -> None:
    readings = [Reading(1.0, STUCK), Reading(5.0, STUCK), Reading(11.0, STUCK)]
    assert stalled(readings, last_progress_s=0.0, now_s=11.0, stall_s=10.0) == STUCK
    assert stalled(readings, last_progress_s=0.0, now_s=10.9, stall_s=10.0) is None  # not quiet that long
    assert stalled(readings, last_progress_s=0.0, now_s=11.0, stall_s=0.0) is None  # off


def test_a_reading_old_enough_is_needed() -> None:
    # The first reading came 9 s before now: the slots are known unchanged for 9 s only.
    assert stalled([Reading(2.0, STUCK), Reading(11.0, STUCK)], 0.0, 11.0, 10.0) is None
    # Readings from before the last byte do not count.
    assert stalled([Reading(1.0, STUCK), Reading(12.0, STUCK)], 1.5, 12.0, 10.0) is None


@pytest.mark.parametrize(
    ("later", "why"),
    [
        ({0: (9, 1, 3)}, "prompt tokens processed: a long prompt is progress"),
        ({0: (7, 2, 3)}, "a token decoded"),
        ({0: (7, 1, 3), 1: (0, 0, 4)}, "another slot took work"),
        ({}, "the slot finished"),
        (None, "/slots could not be read: undecided"),
    ],
)
def test_any_change_or_unreadable_slots_is_not_a_stall(later: dict[int, tuple[int, int, int]] | None, why: str) -> None:
    readings = [Reading(0.5, STUCK), Reading(6.0, later), Reading(11.0, STUCK)]
    assert stalled(readings, 0.0, 11.0, 10.0) is None, why


def test_the_latest_reading_before_the_window_is_the_baseline() -> None:
    # Progress at 3 s, none after: from the reading at 4 s on, nothing changed for 10 s.
    readings = [Reading(1.0, {0: (5, 0, 3)}), Reading(4.0, STUCK), Reading(9.0, STUCK), Reading(14.0, STUCK)]
    assert stalled(readings, 0.0, 14.0, 10.0) == STUCK
    assert stalled(readings, 0.0, 13.9, 10.0) is None


def test_busy_slots_read_from_llama_servers_answer() -> None:
    answer = [
        {
            "id": 0,
            "id_task": 12,
            "is_processing": True,
            "n_prompt_tokens_processed": 40,
            "next_token": [{"n_decoded": 3}],
        },
        {"id": 1, "id_task": -1, "is_processing": False, "next_token": {"n_decoded": 9}},
        {"id": 2, "id_task": 13, "is_processing": True, "next_token": {"n_decoded": 2}},
    ]
    assert busy_slots(answer) == {0: (40, 3, 12), 2: (0, 2, 13)}
    assert busy_slots({"error": "slots endpoint is disabled"}) is None
    assert busy_slots([{"is_processing": True}]) is None
    odd = [{"id": 0, "is_processing": True, "n_prompt_tokens_processed": "4", "next_token": [{"n_decoded": None}, {}]}]
    assert busy_slots(odd) == {0: (0, 0, None)}  # counts that are not whole numbers read as 0
    assert describe({0: (40, 3, 12)}) == "slot 0 (task 12): 40 prompt tokens, 3 decoded"
    assert describe({}) == "no slot busy"


# ---- on a daemon ------------------------------------------------------------------------------------------


def _stalling(standin: Path, **env: str) -> dict[str, object]:
    health = {"interval": 0.2, "stall_s": 1, "stall_failures": 2}
    return {"binary": str(standin), "autostart": True, "health": health, "env": env}


def test_a_silent_server_is_cut_with_504_and_replaced_after_its_stalls(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    daemon = start_daemon(write_config({"m": _stalling(standin, STANDIN_STALL="1")}))
    first_pid = daemon.wait_for("m", lambda s: s["state"] == "ready")["pid"]

    plain = daemon.http.post("/v1/chat/completions", json={"model": "m", "messages": CHAT}, timeout=30)
    assert plain.status_code == 504
    error = error_of(plain)
    assert error["code"] == "stall" and error["type"] == "server_error"
    assert "slot 0 (task 1)" in error["message"]

    with daemon.http.stream(
        "POST", "/v1/chat/completions", json={"model": "m", "messages": CHAT, "stream": True}, timeout=30
    ) as stream:
        assert stream.status_code == 200  # the server's, sent before it went silent
        events = [json.loads(line.removeprefix("data: ")) for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[0]["choices"][0]["delta"]["content"] == "one"
    assert events[-1]["error"]["code"] == "stall" and len(events) == 2

    messages = event_messages(daemon)
    stalls = [m for m in messages if "no progress for 1s on m" in m]
    assert stalls[0].startswith("POST /v1/chat/completions: ") and stalls[0].endswith("(stall 1/2)")
    assert stalls[1].endswith("(stall 2/2)")
    assert "replacing it after 2 stalls" in messages
    second = daemon.wait_for("m", lambda s: s["state"] == "ready" and s["pid"] not in (None, first_pid))
    assert not psutil.pid_exists(first_pid)
    assert second["requests_in_flight"] == 0


def test_a_long_prompt_being_processed_is_not_cut(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    daemon = start_daemon(write_config({"m": _stalling(standin)}))
    daemon.wait_for("m", lambda s: s["state"] == "ready")
    # Three times stall_s without a byte, while /slots shows the prompt's processing advance.
    answer = daemon.http.post("/v1/chat/completions", json={"model": "m", "messages": CHAT, "prompt_s": 3}, timeout=30)
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "stand-in"
    assert not [m for m in event_messages(daemon) if "no progress" in m]
    stats = poll_until(lambda: daemon.http.get("/upstream/m/stats").json(), lambda s: s["finished"] == 1, "done", 5)
    assert stats["cancelled"] == 0


# ---- the watch, its server faked ------------------------------------------------------------------------


async def test_stalls_count_from_the_last_ready_and_replace_at_the_limit() -> None:
    """Three quiet requests on a server whose one slot never moves, with a ready between the first two:
    the count starts over there, so only the third (the second since ready) asks for a restart."""
    slots = [{"id": 0, "id_task": 5, "is_processing": True, "n_prompt_tokens_processed": 7, "next_token": [{}]}]
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda _: httpx.Response(200, json=slots)))
    events: Bus[Event] = Bus(10, keep=10)
    restarted: list[str] = []
    spawned: list[asyncio.Task[None]] = []

    async def restart(instance: str) -> None:
        restarted.append(instance)

    watch = StallWatch(http, events, restart, lambda c: spawned.append(asyncio.ensure_future(c)))
    health = HealthSettings(stall_s=0.2, stall_failures=2)
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def silent(_: Send) -> Answer:
        await asyncio.Event().wait()  # never answers: cancelled by the watch
        raise AssertionError("unreachable")

    for count in (1, 2, 3):
        with pytest.raises(Stalled) as stall:
            await watch.guard("m", 1, health, "POST /v1/completions", silent, send)
        assert not stall.value.sent and "slot 0 (task 5): 7 prompt tokens, 0 decoded" in stall.value.reason
        if count == 1:
            watch.forget("m")
    await asyncio.gather(*spawned)
    await http.aclose()
    assert restarted == ["m"] and sent == []
    told = [e.message for e in events.recent(10)]
    assert [m.rsplit("(", 1)[-1] for m in told if "stall " in m] == ["stall 1/2)", "stall 1/2)", "stall 2/2)"]
    assert told[-1] == "replacing it after 2 stalls"


async def test_a_client_slow_to_take_the_answer_is_no_stall_of_the_server() -> None:
    """The server answered (no slot busy) and the client reads slowly: the wait is on the client, so the
    request is neither cut nor counted against the server."""
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda _: httpx.Response(200, json=[])))
    events: Bus[Event] = Bus(10, keep=10)
    client_reads = asyncio.Event()

    async def restart(instance: str) -> None:
        raise AssertionError(f"{instance} restarted for its client's pace")

    async def slow_client(message: Message) -> None:
        if message.get("body"):
            await client_reads.wait()

    async def answered(send: Send) -> Answer:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x" * 1024, "more_body": False})
        return Answer(status=200, streamed=False, ttfb_s=0.0, kept=b"")

    spawned: list[asyncio.Task[None]] = []
    watch = StallWatch(http, events, restart, lambda c: spawned.append(asyncio.ensure_future(c)))
    health = HealthSettings(stall_s=0.2, stall_failures=1)
    loop = asyncio.get_running_loop()
    loop.call_later(0.6, client_reads.set)  # three times stall_s with the answer on its way
    answer = await watch.guard("m", 1, health, "POST /v1/completions", answered, slow_client)
    await http.aclose()
    assert answer.status == 200 and not spawned and not [e for e in events.recent(10) if e.kind == "stall"]
