"""`routing: prefix` with a real daemon and two real llama-server replicas: chats that share a long system
prompt go to one replica, which computes the prompt once (`timings.prompt_n` small on repeat), but for one
passed on by the bound on requests given; after a live reload to `routing: least-busy` the same requests
spread over both."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import ConfigWriter, Daemon, poll_until
from tests.test_ollama import sim_gpus
from tests.test_reload import same_daemon

StartDaemon = Callable[[Path], Daemon]
REPLICAS = ("tiny@0", "tiny@1")
# The tiny model's vocabulary is bytes: this is about 700 tokens, computed once per replica's cache.
SYSTEM = "You are the launcher's help desk. Answer in one short sentence, citing the manual's section. " * 7


def two_replicas(**over: Any) -> dict[str, dict[str, Any]]:
    # Two slots each: the last request may still count in flight on its replica when the next one comes.
    return {"tiny": {"replicas": 2, "autostart": True, "ctx": 4096, "args": ["--parallel", "2"], **over}}


def ask(daemon: Daemon, questions: list[str], recorded: int, system: str = SYSTEM) -> tuple[list[str], list[int]]:
    """The replicas that answered chats with the shared system prompt, one after the other, and the prompt
    tokens each computed. ``recorded``: the requests the daemon recorded before."""
    computed = []
    for question in questions:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        body = {"model": "tiny", "messages": messages, "max_tokens": 1}
        answer = daemon.http.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
        computed.append(answer.json()["timings"]["prompt_n"])

    # A request is recorded once its answer is sent: wait for the last one's record.
    def records() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = daemon.http.get("/requests").json()
        return found

    done = poll_until(records, lambda r: len(r) == recorded + len(questions), "the requests' records", 30)
    return [record["instance"] for record in done[recorded:]], computed


def test_a_shared_system_prompt_goes_to_one_replica_and_hits_its_cache(
    write_config: ConfigWriter, start_daemon: StartDaemon
) -> None:
    config = write_config(two_replicas(), gpus=sim_gpus(2))
    daemon = start_daemon(config)
    for name in REPLICAS:
        daemon.wait_for(name, lambda s: s["state"] == "ready")

    instances, computed = ask(daemon, [f"Question {n}: what does a replica do?" for n in range(4)], 0)
    # The prefix's replica, but for the third: the owner had 2 of the 2 requests given, at the bound on
    # requests given, ceil(1.1 x 3 / 2) = 2 (routing_epsilon 0.1), so that one went to the next replica.
    owner, other = instances[0], instances[2]
    assert instances == [owner, owner, other, owner] and other != owner, instances
    assert computed[0] > len(SYSTEM) and computed[2] > len(SYSTEM), computed  # each replica's first: whole
    assert computed[1] < 100 and computed[3] < 100, computed  # then only the new question: the cache held the rest

    write_config(two_replicas(routing="least-busy"), gpus=sim_gpus(2), daemon=same_daemon(config))
    assert daemon.http.post("/config/reload").status_code == 200
    assert all(daemon.instance(name)["state"] == "ready" for name in REPLICAS)  # live: nothing restarted
    other_system = "Front desk. " + SYSTEM  # new to both replicas from its first characters
    instances, computed = ask(daemon, [f"Question {n}: and a slot?" for n in range(4)], 4, other_system)
    assert set(instances) == set(REPLICAS), instances  # round-robin among the idle
    assert len([n for n in computed if n > len(other_system)]) == 2, computed  # each replica computed it whole
