"""The front door (/v1, /upstream) on a real daemon, with real clients (OpenAI's and Ollama's packages):
real llama-servers of the tiny model where the behaviour is the server's (answers, streams, a replica
killed mid-stream), the llama-server stand-in where a test must hold a stream open or make a server fail,
and the Ollama stand-in. Simulated GPUs give the planner something to decide on demand.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import ConfigWriter, Daemon, poll_until, write_secret
from tests.test_ollama import ollama_model, sim_gpus

StartDaemon = Callable[[Path], Daemon]
CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello"}]


def held(model: str, **extra: Any) -> dict[str, Any]:
    """A streamed request the stand-in holds after its first event, until released or left."""
    return {"model": model, "messages": CHAT, "stream": True, "hold": True, **extra}


def standin_stats(daemon: Daemon, model: str) -> dict[str, Any]:
    stats: dict[str, Any] = daemon.http.get(f"/upstream/{model}/stats").json()
    return stats


def first_event(lines: Any) -> dict[str, Any]:
    for line in lines:
        if line.startswith("data: "):
            event: dict[str, Any] = json.loads(line.removeprefix("data: "))
            return event
    raise AssertionError("the stream ended before its first event")


def event_messages(daemon: Daemon) -> list[str]:
    lines = daemon.http.get("/events", params={"recent": 500, "follow": False}).iter_lines()
    return [json.loads(line.removeprefix("data: "))["message"] for line in lines if line.startswith("data: ")]


def error_of(response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"]), body
    error: dict[str, Any] = body["error"]
    return error


def test_openai_client_by_name_and_alias_over_two_replicas(
    write_config: ConfigWriter, start_daemon: StartDaemon
) -> None:
    chat = {"aliases": ["small"], "replicas": 2, "autostart": True}
    embed = {"aliases": ["vectors"], "autostart": True, "args": ["--embeddings", "--pooling", "mean"]}
    daemon = start_daemon(write_config({"tiny": chat, "embed": embed}, gpus=sim_gpus(2)))
    for name in ("tiny@0", "tiny@1", "embed"):
        daemon.wait_for(name, lambda s: s["state"] == "ready")
    client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0)

    listed = {m.id: m.model_extra for m in client.models.list()}
    assert set(listed) == {"tiny", "small", "embed", "vectors"}
    assert (listed["small"] or {})["alias_of"] == "tiny" and (listed["small"] or {})["state"] == "ready"
    plain = client.chat.completions.create(model="small", messages=CHAT, max_tokens=4)
    assert plain.usage is not None and plain.usage.completion_tokens == 4
    # Greedy: a sampled answer of the tiny model's random weights may be bytes that make up fewer characters
    # than tokens (a CI run once got one chunk of text from six tokens).
    stream = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, stream=True, temperature=0)
    chunks = list(stream)
    texts = [c.choices[0].delta.content for c in chunks if c.choices]
    assert sum(1 for text in texts if text is not None) >= 2, texts
    vectors = client.embeddings.create(model="vectors", input=["one", "two"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) > 0
    for _ in range(4):
        client.completions.create(model="tiny", prompt="Hi", max_tokens=2)

    records = daemon.http.get("/requests").json()
    served_by = {r["instance"] for r in records if r["model"] == "tiny"}
    assert served_by == {"tiny@0", "tiny@1"}, records  # both replicas take requests
    streamed = next(r for r in records if r["streamed"])
    assert streamed["generated_tokens"] == 6 and streamed["tokens_per_s"] > 0 and streamed["ttfb_ms"] > 0
    metrics = daemon.http.get("/metrics").text
    assert 'launcher_requests_total{code="200",instance="embed",model="embed"} 1.0' in metrics
    assert "launcher_generated_tokens_total" in metrics and "launcher_request_ttfb_seconds_bucket" in metrics


def test_a_stream_passes_through_as_it_comes_and_a_client_leaving_cancels_it(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    daemon = start_daemon(write_config({"held": {"binary": str(standin), "autostart": True}}))
    daemon.wait_for("held", lambda s: s["state"] == "ready")
    with daemon.http.stream("POST", "/v1/chat/completions", json=held("held")) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.headers["x-accel-buffering"] == "no"
        lines = stream.iter_lines()  # kept: a dropped line iterator closes the response
        assert first_event(lines)["choices"][0]["delta"]["content"] == "one"
        # The first event is here while the server still holds the rest: nothing was buffered.
        assert standin_stats(daemon, "held")["finished"] == 0
        assert daemon.instance("held")["requests_in_flight"] == 1
        status = daemon.cli("status")
        assert "REQS/QUEUED" in status.stdout and "1/0" in status.stdout
    # The client left: the server sees its connection close and stops.
    poll_until(lambda: standin_stats(daemon, "held"), lambda s: s["cancelled"] == 1, "cancelled", 10)
    assert daemon.instance("held")["requests_in_flight"] == 0
    chats = [r for r in daemon.http.get("/requests").json() if r["path"] == "/v1/chat/completions"]
    assert chats[-1]["status"] == 499  # nginx's code for a client that went away

    with daemon.http.stream("POST", "/v1/chat/completions", json=held("held")) as stream:
        lines = stream.iter_lines()
        first_event(lines)
        daemon.http.post("/upstream/held/release", json={})
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]" and json.loads(rest[-2].removeprefix("data: "))["usage"]["completion_tokens"] == 2


def test_requests_wait_for_a_restart_instead_of_failing(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    # The stand-in answers 503 (loading) for its first second after each start.
    model = {"binary": str(standin), "autostart": True, "env": {"STANDIN_LOAD_S": "1"}}
    daemon = start_daemon(write_config({"m": model}))
    daemon.wait_for("m", lambda s: s["state"] == "ready")
    assert daemon.http.post("/instances/m/restart").json()["state"] != "ready"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(daemon.http.post, "/v1/chat/completions", json={"model": "m", "messages": CHAT})
        queued = poll_until(lambda: daemon.instance("m"), lambda s: s["requests_queued"] == 1, "queued", 10)
        assert queued["state"] in ("starting", "loading")
        assert answer.result(timeout=30).status_code == 200
    assert daemon.instance("m")["requests_queued"] == 0


def test_requests_that_come_while_a_model_stops_wait_for_it(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    # Servers that ignore SIGTERM: each stop lasts stop_timeout (1 s) before the KILL, time to send a request.
    slow_stop = {"binary": str(standin), "stop_timeout": 1, "env": {"STANDIN_IGNORE_TERM": "1"}}
    models = {"r": {**slow_stop, "autostart": True}, "o": {**slow_stop, "on_demand": True, "idle_ttl_s": 0.3}}
    daemon = start_daemon(write_config(models))
    daemon.wait_for("r", lambda s: s["state"] == "ready")
    chat = {"messages": CHAT}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        restart = pool.submit(daemon.http.post, "/instances/r/restart")
        poll_until(lambda: daemon.instance("r"), lambda s: s["state"] == "stopping", "r stopping", 10)
        during_restart = pool.submit(daemon.http.post, "/v1/chat/completions", json={"model": "r", **chat})
        assert restart.result(timeout=30).status_code == 202
        assert during_restart.result(timeout=30).status_code == 200

        assert daemon.http.post("/v1/chat/completions", json={"model": "o", **chat}).status_code == 200
        poll_until(lambda: daemon.instance("o"), lambda s: s["state"] == "stopping", "o stopping when idle", 10)
        during_stop = daemon.http.post("/v1/chat/completions", json={"model": "o", **chat})
        assert during_stop.status_code == 200  # started again for it, not refused
    assert any("starting o for a request" in e for e in event_messages(daemon)[-30:])


def test_a_client_leaving_frees_the_slot_and_a_replica_killed_mid_stream(
    write_config: ConfigWriter, start_daemon: StartDaemon
) -> None:
    # Not restarted: a tiny model is back within 50 ms, before the requests that must avoid it.
    model = {
        "replicas": 2,
        "autostart": True,
        "ctx": 2048,
        "args": ["-np", "1", "--metrics"],
        "restart": {"policy": "never"},
    }
    daemon = start_daemon(write_config({"tiny": model}, gpus=sim_gpus(2)))
    for name in ("tiny@0", "tiny@1"):
        daemon.wait_for(name, lambda s: s["state"] == "ready")
    long = {"model": "tiny", "prompt": "Hi", "max_tokens": 1900, "ignore_eos": True, "stream": True}

    with daemon.http.stream("POST", "/v1/completions", json=long) as leaving:
        lines = leaving.iter_lines()
        first_event(lines)
        busy = next(s for s in daemon.http.get("/instances").json() if s["requests_in_flight"] == 1)
    server = httpx.Client(base_url=f"http://127.0.0.1:{busy['port']}")
    poll_until(lambda: server.get("/slots").json(), lambda s: not s[0]["is_processing"], "slot free", 10)
    predicted = next(
        float(line.split()[-1])
        for line in server.get("/metrics").text.splitlines()
        if line.startswith("llamacpp:tokens_predicted_total")
    )
    assert predicted < 1900  # it stopped when the client left, not after all it was asked for
    server.close()
    # The front door counts it out too (a little after the server stops), so the next stream's replica is
    # the only one with a request in flight.
    poll_until(
        lambda: daemon.http.get("/instances").json(),
        lambda s: all(i["requests_in_flight"] == 0 for i in s),
        "no request in flight",
        10,
    )

    client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0)
    stream = client.completions.create(
        model="tiny", prompt="Hi", max_tokens=1900, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(stream))
    [busy] = [s for s in daemon.http.get("/instances").json() if s["requests_in_flight"] == 1]
    os.kill(busy["pid"], signal.SIGKILL)
    with pytest.raises(openai.APIError, match=f"{busy['name']}|broke off"):
        for _ in stream:
            pass
    other = "tiny@1" if busy["name"] == "tiny@0" else "tiny@0"
    for _ in range(3):
        assert client.completions.create(model="tiny", prompt="Hi", max_tokens=2).choices
    records = daemon.http.get("/requests").json()
    assert records[-4]["instance"] == busy["name"] and records[-4]["status"] == 502  # the stream cut short
    assert [r["instance"] for r in records[-3:]] == [other] * 3 and all(r["status"] == 200 for r in records[-3:])


def test_on_demand_by_vram_with_lru_eviction_and_idle_stop(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    # One GPU of 200 MiB; each model's plan takes 104 MiB (the tiny model and 100 MiB of overhead):
    # one fits, two do not.
    gpus = {"backend": "sim", "poll_interval": 0.1, "margin_mib": 0, "overhead_mib": 100}
    gpus["sim"] = [{"name": "Small", "memory_mib": 200}]
    on_demand = {"binary": str(standin), "on_demand": True, "health": {"interval": 0.2}}
    models = {"a": dict(on_demand), "b": dict(on_demand), "c": {**on_demand, "idle_ttl_s": 0.5}}
    daemon = start_daemon(write_config(models, gpus=gpus))
    client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0)
    assert {m.id: (m.model_extra or {})["state"] for m in client.models.list()} == dict.fromkeys("abc", "stopped")

    assert client.chat.completions.create(model="a", messages=CHAT).model == "a"
    assert daemon.instance("a")["state"] == "ready"
    assert client.chat.completions.create(model="b", messages=CHAT).model == "b"
    assert daemon.instance("a")["state"] == "stopped"  # the idle one made room
    events = event_messages(daemon)
    assert any("stopping idle a to make room for b" in e for e in events)
    assert any("starting b for a request" in e for e in events)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with daemon.http.stream("POST", "/v1/chat/completions", json=held("b")) as stream:
            lines = stream.iter_lines()
            first_event(lines)
            waiting = pool.submit(client.chat.completions.create, model="a", messages=CHAT)
            poll_until(lambda: event_messages(daemon), lambda e: "a waits for room: b is busy" in e, "a waits", 10)
            assert daemon.instance("b")["state"] == "ready"  # never stopped with a request in flight
            assert not waiting.done()
            daemon.http.post("/upstream/b/release", json={})
        assert waiting.result(timeout=30).model == "a"  # started once b went idle
    assert daemon.instance("b")["state"] == "stopped"

    assert client.chat.completions.create(model="c", messages=CHAT).model == "c"
    poll_until(lambda: daemon.instance("c"), lambda s: s["state"] == "stopped", "c stopped when idle", 10)
    events = event_messages(daemon)
    assert any("stopping c: no request for 0.5s" in e for e in events)


def test_evict_never_keeps_what_runs(write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path) -> None:
    gpus = {"backend": "sim", "poll_interval": 0.1, "margin_mib": 0, "overhead_mib": 100}
    gpus["sim"] = [{"name": "Small", "memory_mib": 200}]  # room for one of the two (see the test above)
    on_demand = {"binary": str(standin), "on_demand": True}
    daemon = start_daemon(write_config({"a": on_demand, "b": on_demand}, gpus=gpus, router={"evict": "never"}))
    assert daemon.http.post("/v1/chat/completions", json={"model": "a", "messages": CHAT}).status_code == 200
    refused = daemon.http.post("/v1/chat/completions", json={"model": "b", "messages": CHAT})
    assert refused.status_code == 503 and error_of(refused)["code"] == "no_room"
    assert daemon.instance("a")["state"] == "ready" and daemon.instance("b")["state"] == "stopped"


def test_errors_in_openai_shape(write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path) -> None:
    one = {"binary": str(standin), "autostart": True, "max_concurrency": 1, "health": {"interval": 0.2}}
    models = {
        "one": {**one, "queue_max": 0},
        "wait": {**one, "queue_max": 1, "queue_timeout_s": 0.3},
        "idle": {"binary": str(standin)},  # configured, not running, not on demand
    }
    daemon = start_daemon(write_config(models))
    for name in ("one", "wait"):
        daemon.wait_for(name, lambda s: s["state"] == "ready")
    post = daemon.http.post

    not_json = post("/v1/chat/completions", content=b"{nope", headers={"Content-Type": "application/json"})
    assert (not_json.status_code, error_of(not_json)["code"]) == (400, "invalid_json")
    as_text = post("/v1/chat/completions", content=b'{"model": "one"}', headers={"Content-Type": "text/plain"})
    assert (as_text.status_code, error_of(as_text)["code"]) == (415, "unsupported_media")
    no_model = post("/v1/chat/completions", json={"messages": CHAT})
    assert (no_model.status_code, error_of(no_model)["type"]) == (400, "invalid_request_error")
    unknown = post("/v1/chat/completions", json={"model": "gpt-9"})
    assert unknown.status_code == 404 and "known: idle, one, wait" in error_of(unknown)["message"]
    assert daemon.http.get("/v1/chat/completions").status_code == 405
    stopped = post("/v1/chat/completions", json={"model": "idle"})
    assert stopped.status_code == 503 and "launcher up idle" in error_of(stopped)["message"]

    for model, code in (("one", "queue_full"), ("wait", "queue_timeout")):
        with daemon.http.stream("POST", "/v1/chat/completions", json=held(model)) as stream:
            lines = stream.iter_lines()
            first_event(lines)
            busy = post("/v1/chat/completions", json={"model": model, "messages": CHAT})
            assert (busy.status_code, error_of(busy)["code"], busy.headers["retry-after"]) == (429, code, "1")
            daemon.http.post(f"/upstream/{model}/release", json={})

    dropped = post("/v1/drop", json={"model": "one"})
    assert dropped.status_code == 502 and "instance one of one failed" in error_of(dropped)["message"]

    # The slots' prompt caches and Ollama's store are the launcher's: /upstream passes reads of them only.
    for method, path in (("POST", "/upstream/one/slots/0?action=save"), ("POST", "/upstream/one/%73lots/0")):
        refused = daemon.http.request(method, path, json={"filename": "x.bin"})
        assert (refused.status_code, error_of(refused)["code"]) == (403, "launcher_owned"), path
    assert daemon.http.get("/upstream/wait/slots").status_code == 200


def test_keys_on_a_public_bind(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    write_secret(token_file, "admin-token\n")
    daemon_settings = {"host": "0.0.0.0", "token_file": str(token_file)}
    config = write_config({"m": {"binary": str(standin)}}, daemon=daemon_settings, router={"api_keys": ["user-key"]})
    daemon = start_daemon(config)
    models = daemon.url + "/v1/models"
    refused = httpx.get(models)
    assert refused.status_code == 401 and error_of(refused)["code"] == "invalid_api_key"
    assert refused.headers["www-authenticate"] == "Bearer"
    assert httpx.get(models, headers={"Authorization": "Bearer wrong"}).status_code == 401
    for key in ("user-key", "admin-token"):
        assert httpx.get(models, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert httpx.get(models, headers={"x-api-key": "user-key"}).status_code == 200
    upstream = httpx.get(daemon.url + "/upstream/m/health")
    assert upstream.status_code == 401


async def test_ollama_through_upstream_and_v1(
    write_config: ConfigWriter, start_daemon: StartDaemon, ollama_standin: Path, tmp_path: Path
) -> None:
    model = ollama_model(ollama_standin, tmp_path, autostart=True, aliases=["qwen"])
    daemon = start_daemon(write_config({"ol": model}, gpus=sim_gpus(1)))
    daemon.wait_for("ol", lambda s: s["state"] == "ready")
    native = ollama.AsyncClient(host=f"{daemon.url}/upstream/ol")
    answer = await native.generate(model="qwen2.5:7b", prompt="Hello")
    assert answer.response == "stand-in" and answer.eval_count == 5
    client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0)
    # The front door's name for it is "qwen"; Ollama's is qwen2.5:7b, which the stand-in answers to only.
    reply = client.chat.completions.create(model="qwen", messages=CHAT)
    assert reply.model == "qwen2.5:7b" and reply.choices[0].message.content == "stand-in"
    records = daemon.http.get("/requests").json()
    assert records[0]["path"] == "/upstream/ol/api/generate" and records[0]["tokens_per_s"] == 50.0
    assert 'launcher_requests_total{code="200",instance="ol",model="ol"} 2.0' in daemon.http.get("/metrics").text
