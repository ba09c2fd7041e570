"""Reload timings with a real daemon (`launcher serve`) and real llama-servers on a tiny model: SIGHUP after an
edit that changes one model's `ctx` -> that model ready again with its new server, against the baseline of
the same model restarted through the API (`POST /instances/NAME/restart`) in the same run; and the restarts
of a model the edits never touch (target 0, same pid throughout).

Usage: .venv/bin/python bench/reload.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from launcher.config_yaml import dump_config_yaml
from launcher.tinymodel import write_tiny_llama

_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write(path: Path, port: int, model: Path, ctx: int) -> None:
    entry = {"model": str(model), "autostart": True, "port": "auto"}
    daemon = {"port": port, "state_dir": str(path.parent / "state"), "instance_ports": [28600, 28699]}
    models = {"kept": {**entry, "ctx": 256}, "changed": {**entry, "ctx": ctx}}
    path.write_text(dump_config_yaml({"daemon": daemon, "gpus": {"backend": "none"}, "models": models}))


def until(http: httpx.Client, name: str, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + _TIMEOUT_S
    while time.monotonic() < deadline:
        status: dict[str, Any] = http.get(f"/instances/{name}").json()
        if predicate(status):
            return status
        time.sleep(0.005)
    raise TimeoutError(f"{name} did not get there within {_TIMEOUT_S}s")


def ready_with_a_new_pid(pid: int) -> Callable[[dict[str, Any]], bool]:
    return lambda s: s["state"] == "ready" and s["pid"] not in (None, pid)


def measure(rounds: int, tmp: Path) -> tuple[list[float], list[float], dict[str, Any], dict[str, Any]]:
    model, config, port = write_tiny_llama(tmp / "m.gguf"), tmp / "launcher.yaml", free_port()
    write(config, port, model, 256)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "launcher", "--config", str(config), "serve"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            deadline = time.monotonic() + _TIMEOUT_S
            while time.monotonic() < deadline:
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
            kept = until(http, "kept", lambda s: s["state"] == "ready")
            by_reload, by_restart = [], []
            for n in range(rounds):
                pid = until(http, "changed", lambda s: s["state"] == "ready")["pid"]
                write(config, port, model, 512 if n % 2 == 0 else 256)
                began = time.perf_counter()
                os.kill(daemon.pid, signal.SIGHUP)
                pid = until(http, "changed", ready_with_a_new_pid(pid))["pid"]
                by_reload.append(time.perf_counter() - began)
                began = time.perf_counter()
                http.post("/instances/changed/restart")
                until(http, "changed", ready_with_a_new_pid(pid))
                by_restart.append(time.perf_counter() - began)
            return by_reload, by_restart, kept, http.get("/instances/kept").json()
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    rounds = parser.parse_args().rounds
    with tempfile.TemporaryDirectory() as tmp_name:
        by_reload, by_restart, before, after = measure(rounds, Path(tmp_name))
    reload_ms, restart_ms = statistics.median(by_reload) * 1000, statistics.median(by_restart) * 1000
    print(f"{rounds} rounds, a real daemon and llama-servers on a tiny model ({os.cpu_count()} cores):")
    print("| | median | max |")
    print("|---|---|---|")
    print(f"| SIGHUP (ctx changed) -> the changed model ready | {reload_ms:.0f} ms | {max(by_reload) * 1000:.0f} ms |")
    print(f"| baseline: POST restart -> ready | {restart_ms:.0f} ms | {max(by_restart) * 1000:.0f} ms |")
    print(f"ratio reload / restart: {reload_ms / restart_ms:.2f}")
    kept = f"pid {before['pid']} -> {after['pid']}, restarts {before['restarts']} -> {after['restarts']}"
    print(f"the kept model over {rounds} reloads: {kept}")


if __name__ == "__main__":
    main()
