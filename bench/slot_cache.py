"""Swap away and back, through a real daemon and a real llama-server (the tiny model): a long prompt, then a
stop and a start (and a restart), then the same prompt again. With the prompt caches kept (the default)
against `kv_cache_max_gib: 0` (recomputed) in the same run: the prompt tokens the server evaluated on
return (`timings.prompt_n`), time to first token (the first streamed event of `/completion`), and the
time a stop and a start (to ready) take, saving and restoring included.

Usage: .venv/bin/python -m bench.slot_cache [--rounds 5] [--words 80] [--ctx 2048]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.drain import daemon, ready, stop_s
from launcher.tinymodel import write_tiny_llama


def start_s(http: httpx.Client) -> float:
    began = time.perf_counter()
    http.post("/instances/m/start")
    ready(http)
    return time.perf_counter() - began


def restart_s(http: httpx.Client) -> float:
    began = time.perf_counter()
    http.post("/instances/m/restart")
    ready(http)
    return time.perf_counter() - began


def event_s(http: httpx.Client, begins: str) -> float:
    """The seconds the instance's last `kv-cache` event beginning with ``begins`` says it took (0 if none)."""
    events = [e["message"] for e in http.get("/instances/m").json()["events"] if e["kind"] == "kv-cache"]
    said = [m for m in events if m.startswith(begins)]
    return float(said[-1].rsplit(" in ", 1)[1].rstrip("s")) if said else 0.0


def ask(http: httpx.Client, prompt: str) -> tuple[float, int, int]:
    """The prompt streamed from the instance's server: (seconds to the first event, prompt tokens, evaluated)."""
    port = http.get("/instances/m").json()["port"]
    body = {"prompt": prompt, "n_predict": 4, "stream": True}
    began = time.perf_counter()
    first: float | None = None
    last: dict[str, Any] = {}
    with httpx.stream("POST", f"http://127.0.0.1:{port}/completion", json=body, timeout=120) as stream:
        if stream.status_code != 200:
            raise SystemExit(f"the server answered {stream.status_code}: {stream.read().decode()[:300]}")
        for line in stream.iter_lines():
            if line.startswith("data: "):
                first = first if first is not None else time.perf_counter() - began
                last = json.loads(line[6:])
    assert first is not None, "no event"
    return first, last["tokens_evaluated"], last["timings"]["prompt_n"]


def arm(model_file: Path, ctx: int, prompt: str, rounds: int, keep_gib: float) -> dict[str, list[float]]:
    took: dict[str, list[float]] = {
        key: [] for key in ("stop", "start", "restart", "ttft", "evaluated", "save", "restore")
    }
    with tempfile.TemporaryDirectory() as tmp:
        model = {"model": str(model_file), "ctx": ctx, "kv_cache_max_gib": keep_gib}
        with daemon(sys.executable, Path(tmp), model) as http:
            start_s(http)
            _, total, _ = ask(http, prompt)
            for _ in range(rounds):
                took["stop"].append(stop_s(http))
                took["save"].append(event_s(http, "prompt cache saved"))
                took["start"].append(start_s(http))
                took["restore"].append(event_s(http, "prompt cache restored"))
                ttft, _, evaluated = ask(http, prompt)
                took["ttft"].append(ttft)
                took["evaluated"].append(evaluated / total)
                took["restart"].append(restart_s(http))
                ttft, _, evaluated = ask(http, prompt)
                took["ttft"].append(ttft)
                took["evaluated"].append(evaluated / total)
            print(f"prompt: {total} tokens", file=sys.stderr)
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--words", type=int, default=80, help="the prompt's length, in groups of 3 words")
    parser.add_argument("--ctx", type=int, default=2048)
    args = parser.parse_args()
    prompt = " ".join(f"hello world {i}" for i in range(args.words))
    with tempfile.TemporaryDirectory() as tmp:
        model_file = write_tiny_llama(Path(tmp) / "tiny.gguf")
        kept = arm(model_file, args.ctx, prompt, args.rounds, 8.0)
        recomputed = arm(model_file, args.ctx, prompt, args.rounds, 0.0)
    print("| median of each return | caches kept | recomputed | ratio |")
    print("|---|---|---|---|")
    rows = [
        ("prompt tokens evaluated (share of the prompt)", "evaluated", 100, "%"),
        ("time to first token", "ttft", 1000, "ms"),
        ("stop (save included)", "stop", 1000, "ms"),
        ("start to ready (restore included)", "start", 1000, "ms"),
        ("restart to ready", "restart", 1000, "ms"),
        ("of the stop: the save (its event)", "save", 1000, "ms"),
        ("of the start: the restore (its event)", "restore", 1000, "ms"),
    ]
    for name, key, scale, unit in rows:
        this, base = statistics.median(kept[key]), statistics.median(recomputed[key])
        ratio = f"{this / base:.2f}x" if base else "-"
        print(f"| {name} | {this * scale:.1f} {unit} | {base * scale:.1f} {unit} | {ratio} |")


if __name__ == "__main__":
    main()
