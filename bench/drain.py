"""Drain timings through a real daemon: `POST /instances/m/stop` to stopped, of a real llama-server (the tiny
model) with no request in flight, against a baseline launcher (another checkout's Python, e.g. main's)
in the same run; and of the llama-server stand-in with one streamed request in flight that ends
``--remaining`` seconds after the stop was asked for.

Usage: .venv/bin/python bench/drain.py [--stops 10] [--remaining 2] [--baseline /work/main/.venv/bin/python]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from launcher.config_yaml import dump_config_yaml
from launcher.tinymodel import write_tiny_llama

STANDIN = Path(__file__).resolve().parent.parent / "tests" / "standin" / "llama.py"
CHAT = [{"role": "user", "content": "Hello"}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def daemon(python: str, tmp: Path, model: dict[str, Any]) -> Iterator[httpx.Client]:
    port = free_port()
    config = tmp / "launcher.yaml"
    settings = {"daemon": {"state_dir": str(tmp / "state"), "port": port}, "models": {"m": model}}
    config.write_text(dump_config_yaml(settings))
    proc = subprocess.Popen(
        [python, "-m", "launcher", "--config", str(config), "serve"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp,  # `-m` puts the working directory first: a baseline's Python must find its own launcher
        env={**os.environ, "PYTHONPATH": ""},
    )
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                http.get("/health")
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield http
    finally:
        http.close()
        proc.terminate()
        proc.wait(60)


def ready(http: httpx.Client) -> None:
    deadline = time.monotonic() + 60
    while http.get("/instances/m").json()["state"] != "ready":
        assert time.monotonic() < deadline, "never ready"
        time.sleep(0.02)


def stop_s(http: httpx.Client) -> float:
    began = time.perf_counter()
    answer = http.post("/instances/m/stop")
    took = time.perf_counter() - began
    assert answer.json()["state"] == "stopped", answer.text
    return took


def idle_stops(python: str, model_file: Path, stops: int) -> list[float]:
    with (
        tempfile.TemporaryDirectory() as tmp,
        daemon(python, Path(tmp), {"model": str(model_file), "ctx": 256}) as http,
    ):
        took = []
        for _ in range(stops):
            http.post("/instances/m/start")
            ready(http)
            took.append(stop_s(http))
        return took


def busy_stops(python: str, model_file: Path, stops: int, remaining_s: float) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        binary = Path(tmp) / "llama-standin"
        binary.write_text(f'#!/bin/sh\nexec {sys.executable} {STANDIN} "$@"\n')
        binary.chmod(0o755)
        return _busy_stops(python, Path(tmp), {"model": str(model_file), "binary": str(binary)}, stops, remaining_s)


def _busy_stops(python: str, tmp: Path, model: dict[str, Any], stops: int, remaining_s: float) -> list[float]:
    with daemon(python, tmp, model) as http:
        took = []
        for _ in range(stops):
            http.post("/instances/m/start")
            ready(http)
            body = {"model": "m", "messages": CHAT, "stream": True, "hold": True}
            with http.stream("POST", "/v1/chat/completions", json=body) as stream:
                lines = stream.iter_lines()
                next(line for line in lines if line.startswith("data: "))
                url = f"http://127.0.0.1:{http.get('/instances/m').json()['port']}/release"
                release = threading.Timer(remaining_s, httpx.post, (url,), {"json": {}})
                release.start()
                took.append(stop_s(http))
                rest = [line for line in lines if line.startswith("data: ")]
                assert rest[-1] == "data: [DONE]", rest
                release.join()
        return took


def show(name: str, took: list[float]) -> float:
    median = statistics.median(took)
    print(
        f"{name}: median {median * 1000:.1f} ms (min {min(took) * 1000:.1f}, max {max(took) * 1000:.1f}, n={len(took)})"
    )
    return median


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stops", type=int, default=10)
    parser.add_argument("--remaining", type=float, default=2.0)
    parser.add_argument("--baseline", help="the Python of a baseline launcher (another checkout's .venv)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_file = write_tiny_llama(Path(tmp) / "tiny.gguf")
        this = show("stop, nothing in flight (this)", idle_stops(sys.executable, model_file, args.stops))
        if args.baseline:
            base = show("stop, nothing in flight (baseline)", idle_stops(args.baseline, model_file, args.stops))
            print(f"ratio this/baseline: {this / base:.3f}")
        busy = busy_stops(sys.executable, model_file, args.stops, args.remaining)
        show(f"stop, 1 in flight ending {args.remaining:g}s later", busy)


if __name__ == "__main__":
    main()
