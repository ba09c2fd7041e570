"""`routing: prefix` with a real daemon and two real llama-server replicas: chats that share a long system
prompt go to one replica, which computes the prompt once (`timings.prompt_n` small on repeat); after a live
reload to `routing: least-busy` the same requests spread over both."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import ConfigWriter, Daemon
from tests.test_ollama import sim_gpus
from tests.test_reload import same_daemon

StartDaemon = Callable[[Path], Daemon]
REPLICAS = ("tiny@0", "tiny@1")
# The tiny model's vocabulary is bytes: this is about 700 tokens, computed once per replica's cache.
SYSTEM = "You are the launcher's help desk. Answer in one short sentence, citing the manual's section. " * 7


def two_replicas(**over: Any) -> dict[str, dict[str, Any]]:
    return {"tiny": {"replicas": 2, "autostart": True, "ctx": 2048, "args": ["--parallel", "1"], **over}}


def ask(daemon: Daemon, question: str) -> tuple[str, int]:
    """The replica that answered a chat with the shared system prompt, and the prompt tokens it computed."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    answer = daemon.http.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 1})
    assert answer.status_code == 200, answer.text
    record = daemon.http.get("/requests", params={"recent": 1}).json()[-1]
    return record["instance"], answer.json()["timings"]["prompt_n"]


def test_a_shared_system_prompt_goes_to_one_replica_and_hits_its_cache(
    write_config: ConfigWriter, start_daemon: StartDaemon
) -> None:
    config = write_config(two_replicas(), gpus=sim_gpus(2))
    daemon = start_daemon(config)
    for name in REPLICAS:
        daemon.wait_for(name, lambda s: s["state"] == "ready")

    answers = [ask(daemon, f"Question {n}: what does a replica do?") for n in range(4)]
    assert len({instance for instance, _ in answers}) == 1, answers  # the prefix's replica, every time
    first, *repeats = [prompt_n for _, prompt_n in answers]
    assert first > len(SYSTEM)  # the whole prompt computed once
    assert all(n < 50 for n in repeats), answers  # then only the new question: the cache held the rest

    write_config(two_replicas(routing="least-busy"), gpus=sim_gpus(2), daemon=same_daemon(config))
    assert daemon.http.post("/config/reload").status_code == 200
    assert all(daemon.instance(name)["state"] == "ready" for name in REPLICAS)  # live: nothing restarted
    spread = [ask(daemon, f"Question {n}: and a slot?") for n in range(4)]
    assert {instance for instance, _ in spread} == set(REPLICAS), spread  # round-robin among the idle
