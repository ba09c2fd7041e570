"""Prompt-cache-aware routing with a real daemon and two real llama-server replicas of the tiny model on the
CPU: `routing: prefix` against `least-busy` (the baseline, in the same run), each with llama-server's
`--cache-ram` left at its default and set to 0 (no host-memory prompt cache: only the slots' own).

The workload: K system prompts (several hundred tokens each) x Q short questions, and C chats that grow
turn by turn (each turn resends the earlier ones), sent in one seeded random order (a chat's turns keep
their order) by a fixed number of senders. Measured: the prompt tokens the servers computed (the sum of
`timings.prompt_n`), time to first token (p50, p95: each request asks for one token, so its latency is the
time to it) and the requests each replica served. Each configuration runs on a fresh daemon.

`--epsilon` takes several values: one `prefix` row for each (`routing_epsilon`); with a large one (100) the
bound never passes a request on, which is what waiting for the owner would give in prompt tokens while the
senders are no more than the owner's slots (the owner always has room then). `--owner-waits` adds a row
where a request always waits for its prefix's owner (no bound, and no other replica when the owner's slots
are full: its queue is served oldest first, each request by its owner), a bench-only seam in the daemon's
subprocess (`--serve-daemon CONFIG`), to weigh waiting against spilling.

Usage: .venv/bin/python -m bench.prefix_routing [--prompts 4] [--questions 6] [--chats 4] [--turns 5]
       [--senders 4] [--seed 1] [--epsilon 0.1 ...] [--owner-waits]
"""

from __future__ import annotations

import argparse
import os
import queue
import random
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import httpx

from bench.cli import PYTHON, Daemon, free_port, free_port_range
from bench.reload import until
from launcher.config_file import load_settings
from launcher.config_yaml import dump_config_yaml
from launcher.daemon import serve
from launcher.route import choose
from launcher.route.prefix_ring import Replica, ring_order
from launcher.tinymodel import write_tiny_llama

_TIMEOUT_S = 120.0
_SIM_GPUS = [{"name": f"Sim {i}", "memory_mib": 24576} for i in range(2)]
_WORDS = ["slot", "cache", "replica", "prompt", "token", "model", "server", "launcher", "request", "answer"]


def _text(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < chars:
        words.append(rng.choice(_WORDS))
    return " ".join(words)


def workload(prompts: int, questions: int, chats: int, turns: int, seed: int) -> list[list[dict[str, str]]]:
    """The requests' message lists in their sending order. The tiny model's vocabulary is bytes: a
    character is a token, so a system prompt of 600 characters is 600 tokens."""
    rng = random.Random(seed)
    systems = [f"System prompt {k}. " + _text(rng, 600) for k in range(prompts)]
    openers = [f"Chat {c}. " + _text(rng, 300) for c in range(chats)]
    items = [("q", k, q) for k in range(prompts) for q in range(questions)] + [
        ("c", c, t) for c in range(chats) for t in range(turns)
    ]
    rng.shuffle(items)
    sent_turns: Counter[int] = Counter()
    order: list[list[dict[str, str]]] = []
    for kind, index, n in items:
        if kind == "q":
            order.append([{"role": "system", "content": systems[index]}, {"role": "user", "content": f"Q{n}?"}])
            continue
        turn = sent_turns[index]  # a chat's turns go out in order wherever the shuffle put them
        sent_turns[index] += 1
        messages = [{"role": "user", "content": openers[index]}]
        for t in range(turn):
            messages += [{"role": "assistant", "content": f"Answer {t}. " + _text(random.Random(t), 120)}]
            messages += [{"role": "user", "content": f"Follow-up {t + 1}?"}]
        order.append(messages)
    return order


def owner_waits(replicas: Sequence[Replica], key: str, epsilon: float) -> str | None:
    """`prefix_ring.pick_by_prefix` with no bound and no spill: the key's first serving replica on the
    ring, or None (the request waits in the queue) while that one's slots are full."""
    serving = {r.name: r for r in replicas if r.serving}
    for name in ring_order([r.name for r in replicas], key):
        if name in serving:
            return name if serving[name].in_flight < serving[name].limit else None
    return None


def serve_daemon(config: Path) -> None:
    """`launcher serve` whose prefix routing waits for the owner (the daemon's subprocess)."""
    with mock.patch.object(choose, "pick_by_prefix", owner_waits):
        serve(load_settings(config))


@dataclass
class Outcome:
    prompt_n: list[int] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    per_replica: Counter[str] = field(default_factory=Counter)
    failed: int = 0


def run(
    routing: str, epsilon: float, cache_ram: str | None, requests: list[list[dict[str, str]]], senders: int, tmp: Path
) -> Outcome:
    tmp.mkdir()
    model, config, port = write_tiny_llama(tmp / "m.gguf"), tmp / "launcher.yaml", free_port()
    args = ["--parallel", "2", *(["--cache-ram", cache_ram] if cache_ram is not None else [])]
    entry = {"model": str(model), "autostart": True, "port": "auto", "ctx": 8192, "replicas": 2, "args": args}
    daemon_keys = {"port": port, "state_dir": str(tmp / "state"), "instance_ports": list(free_port_range(20))}
    waits = routing == "prefix, owner waits"
    models = {"tiny": {**entry, "routing": "prefix" if waits else routing, "routing_epsilon": epsilon}}
    config.write_text(
        dump_config_yaml({"daemon": daemon_keys, "gpus": {"backend": "sim", "sim": _SIM_GPUS}, "models": models})
    )
    argv = [PYTHON, "-m", "bench.prefix_routing", "--serve-daemon", str(config)] if waits else None
    daemon = Daemon(config, tmp / "daemon.log", argv)
    outcome, work = Outcome(), queue.Queue[list[dict[str, str]]]()
    for messages in requests:
        work.put(messages)
    url = f"http://127.0.0.1:{port}"

    def send() -> None:
        with httpx.Client(base_url=url, timeout=_TIMEOUT_S) as http:
            while True:
                try:
                    messages = work.get_nowait()
                except queue.Empty:
                    return
                began = time.perf_counter()
                body: dict[str, Any] = {"model": "tiny", "messages": messages, "max_tokens": 1}
                answer = http.post("/v1/chat/completions", json=body)
                if answer.status_code != 200:
                    outcome.failed += 1
                    continue
                outcome.ttft_s.append(time.perf_counter() - began)
                outcome.prompt_n.append(answer.json()["timings"]["prompt_n"])

    try:
        daemon.wait_listening(_TIMEOUT_S)
        with httpx.Client(base_url=url, timeout=_TIMEOUT_S) as http:
            for name in ("tiny@0", "tiny@1"):
                try:
                    until(http, name, lambda s: s["state"] == "ready")
                except TimeoutError:
                    raise SystemExit(f"{name} never ready; the daemon's log ends:\n{daemon.tail()}") from None
            threads = [threading.Thread(target=send) for _ in range(senders)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(_TIMEOUT_S * len(requests))
            records = http.get("/requests", params={"recent": 500}).json()
            outcome.per_replica.update(r["instance"] for r in records if r["path"] == "/v1/chat/completions")
        return outcome
    finally:
        daemon.stop()


def _p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--questions", type=int, default=6)
    parser.add_argument("--chats", type=int, default=4)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--epsilon", type=float, nargs="+", default=[0.1], help="routing_epsilon: a prefix row each")
    parser.add_argument("--owner-waits", action="store_true", help="a row where requests wait for their owner")
    parser.add_argument("--serve-daemon", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_daemon is not None:
        serve_daemon(args.serve_daemon)
        return
    requests = workload(args.prompts, args.questions, args.chats, args.turns, args.seed)
    print(
        f"{len(requests)} requests ({args.prompts} system prompts x {args.questions} questions, {args.chats} chats x "
        f"{args.turns} turns), {args.senders} senders, seed {args.seed}, 2 replicas x 2 slots, tiny model, "
        f"{os.cpu_count()} cores"
    )
    print(
        "| --cache-ram | routing | prompt tokens computed | vs least-busy | TTFT p50 | vs least-busy | TTFT p95 "
        "| requests per replica | failed |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    rows = [("least-busy", 0.25)] + [("prefix", epsilon) for epsilon in args.epsilon]
    rows += [("prefix, owner waits", 100.0)] if args.owner_waits else []
    with tempfile.TemporaryDirectory() as tmp_name:
        for cache_ram in (None, "0"):
            base_tokens, base_p50 = 0, 0.0
            for routing, epsilon in rows:
                tmp = Path(tmp_name) / f"{routing}-{epsilon}-{cache_ram}"
                o = run(routing, epsilon, cache_ram, requests, args.senders, tmp)
                total, p50 = sum(o.prompt_n), statistics.median(o.ttft_s)
                base_tokens, base_p50 = base_tokens or total, base_p50 or p50
                counts = sorted(o.per_replica.values(), reverse=True)
                ratio = counts[0] / counts[-1] if len(counts) == 2 and counts[-1] else float("inf")
                name = f"prefix, ε {epsilon:g}" if routing == "prefix" else routing
                print(
                    f"| {cache_ram or 'default'} | {name} | {total} | {total / base_tokens:.2f} | "
                    f"{p50 * 1000:.0f} ms | {p50 / base_p50:.2f} | {_p95(o.ttft_s) * 1000:.0f} ms | "
                    f"{'/'.join(map(str, counts))} ({ratio:.2f}x) | {o.failed} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
