"""Swaps that do not thrash: alternating bursts of requests for two on-demand models that cannot both fit
(one simulated GPU with room for one; real llama-servers of the tiny model), served with the router's
collation against the same router serving strictly in arrival order, in one run, arms taking turns.

Collation is the router's own behaviour: while a model runs, its new requests are served even when
requests for the other model wait for room, and the waiting model's requests are served together after one
swap. "In arrival order" is the same daemon with a gate in front of the router (bench-only, in the daemon's
subprocess: `--serve-daemon CONFIG --in-arrival-order`): a request goes on to the router only once every
older request for the other model has an instance, so a burst for A waits for the burst for B before it,
as a router without collation serves them. Measured: the on-demand starts (swaps) and the wall time from
the first request sent to the last answer; medians over the runs, and their ratio.

Usage: .venv/bin/python -m bench.thrash [--bursts 6] [--size 4] [--gap-ms 250] [--tokens 16] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from unittest import mock

import httpx

from bench.cli import PYTHON, Daemon, free_port
from launcher.config_file import load_settings
from launcher.config_yaml import dump_config_yaml
from launcher.daemon import serve
from launcher.route.router import Router
from launcher.tinymodel import write_tiny_llama

_TIMEOUT_S = 300.0
# One GPU of 200 MiB; each model's plan takes the tiny model and 100 MiB of overhead: one fits, not two.
_ONE_FITS = {"backend": "sim", "margin_mib": 0, "overhead_mib": 100, "sim": [{"name": "Small", "memory_mib": 200}]}
_MODELS = ("a", "b")

Lease = Callable[..., Awaitable[str]]


def in_arrival_order(lease: Lease) -> Lease:
    """``Router._lease`` behind a gate: a request waits until every older request for another model has
    its instance (requests for the same model go on together)."""
    pending: list[tuple[object, str]] = []  # (ticket, model), oldest first, until each has an instance
    changed: asyncio.Condition | None = None

    async def gated(self: Router, model: str, *args: Any) -> str:
        nonlocal changed
        changed = changed or asyncio.Condition()
        ticket = object()
        pending.append((ticket, model))

        def my_turn() -> bool:
            older = pending[: next(i for i, (t, _) in enumerate(pending) if t is ticket)]
            return all(other == model for _, other in older)

        try:
            async with changed:
                await changed.wait_for(my_turn)
            return await lease(self, model, *args)
        finally:
            pending[:] = [(t, m) for t, m in pending if t is not ticket]
            async with changed:
                changed.notify_all()

    return gated


def serve_daemon(config: Path, arrival_order: bool) -> None:
    """`launcher serve`, with the arrival-order gate when asked (the daemon's subprocess)."""
    if not arrival_order:
        serve(load_settings(config))
        return
    with mock.patch.object(Router, "_lease", in_arrival_order(Router._lease)):
        serve(load_settings(config))


def write_config(tmp: Path, model: Path, size: int) -> tuple[Path, int]:
    port = free_port()
    entry = {
        "model": str(model),
        "on_demand": True,
        "ctx": 512,
        "args": ["--parallel", str(size)],
        "queue_timeout_s": _TIMEOUT_S,
    }
    settings = {
        "daemon": {"port": port, "state_dir": str(tmp / "state")},
        "gpus": _ONE_FITS,
        "models": dict.fromkeys(_MODELS, entry),
    }
    config = tmp / "launcher.yaml"
    config.write_text(dump_config_yaml(settings))
    return config, port


def run(model: Path, arrival_order: bool, args: argparse.Namespace, tmp: Path) -> tuple[int, float, int]:
    """One arm on a fresh daemon: (on-demand starts, seconds from the first request to the last answer,
    requests that failed)."""
    tmp.mkdir()
    config, port = write_config(tmp, model, args.size)
    argv = [PYTHON, "-m", "bench.thrash", "--serve-daemon", str(config)]
    daemon = Daemon(config, tmp / "daemon.log", argv + (["--in-arrival-order"] if arrival_order else []))
    failed: list[str] = []
    url = f"http://127.0.0.1:{port}"

    def ask(name: str, go: threading.Event) -> None:
        body = {"model": name, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": args.tokens}
        with httpx.Client(base_url=url, timeout=_TIMEOUT_S) as http:  # made before the burst: not timed
            go.wait(_TIMEOUT_S)
            answer = http.post("/v1/chat/completions", json=body)
        if answer.status_code != 200:
            failed.append(f"{name}: {answer.status_code} {answer.text[:200]}")

    try:
        daemon.wait_listening(_TIMEOUT_S)
        bursts = [threading.Event() for _ in range(args.bursts)]
        asks = [(_MODELS[n % 2], go) for n, go in enumerate(bursts) for _ in range(args.size)]
        threads = [threading.Thread(target=ask, args=one) for one in asks]
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # every client made
        began = time.perf_counter()
        for go in bursts:
            go.set()
            time.sleep(args.gap_ms / 1000)
        for thread in threads:
            thread.join(_TIMEOUT_S)
        took_s = time.perf_counter() - began
        with httpx.Client(base_url=url, timeout=_TIMEOUT_S) as http:
            lines = http.get("/events", params={"recent": 500, "follow": False}).iter_lines()
            events = [json.loads(line.removeprefix("data: "))["message"] for line in lines if line.startswith("data: ")]
        starts = sum(1 for e in events if e.startswith("starting ") and e.endswith(" for a request"))
        for reason in failed[:3]:
            print(f"  failed: {reason}", file=sys.stderr)
        return starts, took_s, len(failed)
    finally:
        daemon.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bursts", type=int, default=6, help="bursts, for a, b, a, b, ...")
    parser.add_argument("--size", type=int, default=4, help="requests in a burst, sent at once (and slots)")
    parser.add_argument("--gap-ms", type=float, default=250, help="between one burst and the next")
    parser.add_argument("--tokens", type=int, default=16, help="max_tokens of each request")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--serve-daemon", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--in-arrival-order", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_daemon is not None:
        serve_daemon(args.serve_daemon, args.in_arrival_order)
        return
    figures: dict[bool, list[tuple[int, float, int]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = write_tiny_llama(tmp / "tiny.gguf")
        for n in range(args.runs):
            for arrival_order in (True, False):
                figures[arrival_order].append(run(model, arrival_order, args, tmp / f"{n}-{arrival_order}"))
    print(
        f"{args.bursts} alternating bursts of {args.size} requests (a, b, a, ...), {args.gap_ms:g} ms apart, "
        f"max_tokens {args.tokens}; two on-demand models, room for one; medians of {args.runs} runs, arms in turn"
    )
    print("| serving | swaps (on-demand starts; each run) | total time | vs arrival order (each run's) | failed |")
    print("|---|---|---|---|---|")
    ratios = [c[1] / a[1] for c, a in zip(figures[False], figures[True], strict=True)]  # each run's own pair
    for arrival_order, name in ((True, "in arrival order"), (False, "collated (the router)")):
        runs = figures[arrival_order]
        starts = statistics.median(s for s, _, _ in runs)
        took_s = statistics.median(t for _, t, _ in runs)
        each = "" if arrival_order else f" ({', '.join(f'{r:.2f}' for r in ratios)})"
        print(
            f"| {name} | {starts:g} ({', '.join(str(s) for s, _, _ in runs)}) | {took_s:.2f} s "
            f"| {1.0 if arrival_order else statistics.median(ratios):.2f}x{each} | {sum(f for _, _, f in runs)} |"
        )


if __name__ == "__main__":
    main()
