"""Swaps that do not thrash, on a real daemon: on-demand models on a simulated GPU with room for one of
them (the stand-in server, which holds a stream open on request), pins and priorities deciding what may be
evicted, and requests collated by model so a burst swaps once. And answers through the front door that
name the model the client asked for, from real llama-servers of the tiny model.
"""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import ConfigWriter, Daemon, poll_until
from tests.test_front_door import CHAT, error_of, event_messages, first_event, held
from tests.test_ollama import sim_gpus

StartDaemon = Callable[[Path], Daemon]
# One GPU of 200 MiB; each model's plan takes 104 MiB (the tiny model and 100 MiB of overhead): one fits.
ONE_FITS = {
    "backend": "sim",
    "poll_interval": 0.1,
    "margin_mib": 0,
    "overhead_mib": 100,
    "sim": [{"name": "Small", "memory_mib": 200}],
}


def chat(daemon: Daemon, model: str) -> httpx.Response:
    return daemon.http.post("/v1/chat/completions", json={"model": model, "messages": CHAT})


def evictions(daemon: Daemon) -> list[str]:
    return [e for e in event_messages(daemon) if "to make room for" in e]


def test_pins_and_priorities_decide_what_is_evicted(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    on_demand: dict[str, Any] = {"binary": str(standin), "on_demand": True, "health": {"interval": 0.2}}
    models = {
        "low": on_demand,
        "high": {**on_demand, "priority": 1},
        "pin": {**on_demand, "pinned": True, "priority": -5},
    }
    daemon = start_daemon(write_config(models, gpus=ONE_FITS))

    assert chat(daemon, "low").status_code == 200
    assert chat(daemon, "high").status_code == 200  # a higher priority evicts the idle lower one
    assert evictions(daemon) == ["stopping idle low to make room for high"]
    assert daemon.instance("low")["state"] == "stopped"

    refused = chat(daemon, "low")  # a lower one never evicts a higher one, idle as it is
    error = error_of(refused)
    assert (refused.status_code, error["code"]) == (503, "no_room")
    assert "high has a higher priority (1 > 0)" in error["message"]
    assert int(refused.headers["retry-after"]) > 0
    assert daemon.instance("high")["state"] == "ready"

    assert daemon.http.post("/instances/high/stop").status_code == 202
    daemon.wait_for("high", lambda s: s["state"] == "stopped")
    pinned = chat(daemon, "pin")
    assert pinned.status_code == 200, pinned.text
    for asker in ("high", "low"):  # pinned: never evicted, not even for a higher priority
        refused = chat(daemon, asker)
        assert refused.status_code == 503 and "pin is pinned" in error_of(refused)["message"]
    assert daemon.instance("pin")["state"] == "ready"
    assert len(evictions(daemon)) == 1


def test_a_burst_for_two_models_that_cannot_both_fit_is_collated(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    on_demand = {"binary": str(standin), "on_demand": True, "max_concurrency": 4, "health": {"interval": 0.2}}
    daemon = start_daemon(write_config({"a": on_demand, "b": on_demand}, gpus=ONE_FITS))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        with daemon.http.stream("POST", "/v1/chat/completions", json=held("a")) as stream:
            lines = stream.iter_lines()  # kept: a generator let go of closes the stream
            first_event(lines)  # a runs, busy
            assert daemon.instance("a")["requests_in_flight"] == 1
            for_b = [pool.submit(chat, daemon, "b") for _ in range(2)]  # b waits for a to go idle...
            poll_until(lambda: event_messages(daemon), lambda e: "b waits for room: a is busy" in e, "b waits", 10)
            # ...and the requests for a that come meanwhile are served by a as it runs, without a swap.
            assert [chat(daemon, "a").status_code for _ in range(3)] == [200] * 3
            assert daemon.instance("b")["state"] == "stopped" and not for_b[0].done()
            daemon.http.post("/upstream/a/release", json={})
        assert [f.result(timeout=30).status_code for f in for_b] == [200, 200]
    assert evictions(daemon) == ["stopping idle a to make room for b"]  # one swap for the whole burst
    records = daemon.http.get("/requests").json()
    served = [(r["model"], r["status"]) for r in records if r["path"] == "/v1/chat/completions"]
    assert served == [("a", 200)] * 4 + [("b", 200)] * 2  # grouped: a's four, then b's two
    assert daemon.instance("a")["state"] == "stopped" and daemon.instance("b")["state"] == "ready"


def test_answers_name_the_model_asked_for_never_the_file(write_config: ConfigWriter, start_daemon: StartDaemon) -> None:
    model = {"autostart": True, "ctx": 2048, "aliases": ["friendly"], "args": ["-np", "2"]}
    daemon = start_daemon(write_config({"tiny": model}, gpus=sim_gpus(1)))
    daemon.wait_for("tiny", lambda s: s["state"] == "ready")
    for asked in ("tiny", "friendly"):
        for route in ("/v1/chat/completions", "/v1/completions"):
            body: dict[str, Any] = {"model": asked, "max_tokens": 3}
            body |= {"messages": CHAT} if route.endswith("chat/completions") else {"prompt": "Hi"}
            plain = daemon.http.post(route, json=body)
            assert plain.status_code == 200 and plain.json()["model"] == asked
            assert ".gguf" not in plain.text
            assert int(plain.headers["content-length"]) == len(plain.content)
            with daemon.http.stream("POST", route, json={**body, "stream": True}) as stream:
                events = [line.removeprefix("data: ") for line in stream.iter_lines() if line.startswith("data: ")]
            documents = [json.loads(e) for e in events if e != "[DONE]"]
            assert documents and all(d["model"] == asked for d in documents)
            assert not any(".gguf" in e for e in events)
    direct = httpx.post(
        f"http://127.0.0.1:{daemon.instance('tiny')['port']}/v1/completions",
        json={"model": "tiny", "prompt": "Hi", "max_tokens": 1},
    )
    assert direct.json()["model"].endswith(".gguf")  # what the server itself says: the file's path
