"""Rolling restarts with a real daemon (`launcher serve`) and real llama-servers on a tiny model: a model with
2 replicas restarted (`POST /instances/tiny/restart`, which answers once the roll is over) while a few
threads send requests to it through the front door without pause: the requests that failed (target 0) and
the roll's duration, against the baseline of a single instance's restart (`POST /instances/single/restart`
-> ready) measured in the same run.

Usage: .venv/bin/python -m bench.rolling [--rounds 10] [--senders 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.cli import Daemon, free_port
from bench.reload import ready_with_a_new_pid, until
from launcher.config_yaml import dump_config_yaml
from launcher.tinymodel import write_tiny_llama

_TIMEOUT_S = 60.0
_SIM_GPUS = [{"name": f"Sim {i}", "memory_mib": 24576} for i in range(2)]


@dataclass
class Load:
    """The requests sent: when each began and ended, and whether it failed (not 200, or no answer)."""

    spans: list[tuple[float, float, bool]] = field(default_factory=list)

    def failed_within(self, windows: list[tuple[float, float]]) -> tuple[int, int]:
        """(requests that overlapped one of ``windows``, those of them that failed)."""
        during = [failed for began, ended, failed in self.spans if any(b < ended and began < e for b, e in windows)]
        return len(during), sum(during)


@contextmanager
def steady_load(url: str, senders: int) -> Iterator[Load]:
    load, stop = Load(), threading.Event()

    def send() -> None:
        with httpx.Client(base_url=url, timeout=_TIMEOUT_S) as http:
            while not stop.is_set():
                began = time.perf_counter()
                try:
                    code = http.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
                    failed = code.status_code != 200
                except httpx.HTTPError:
                    failed = True
                load.spans.append((began, time.perf_counter(), failed))

    threads = [threading.Thread(target=send) for _ in range(senders)]
    for thread in threads:
        thread.start()
    try:
        yield load
    finally:
        stop.set()
        for thread in threads:
            thread.join(_TIMEOUT_S)


def measure(rounds: int, senders: int, tmp: Path) -> tuple[list[float], list[float], Load, list[tuple[float, float]]]:
    model, config, port = write_tiny_llama(tmp / "m.gguf"), tmp / "launcher.yaml", free_port()
    entry = {"model": str(model), "autostart": True, "port": "auto", "ctx": 256}
    daemon_keys = {"port": port, "state_dir": str(tmp / "state"), "instance_ports": [28700, 28799]}
    models = {"tiny": {**entry, "replicas": 2}, "single": entry}
    gpus = {"backend": "sim", "sim": _SIM_GPUS}
    config.write_text(dump_config_yaml({"daemon": daemon_keys, "gpus": gpus, "models": models}))
    daemon = Daemon(config, tmp / "daemon.log")
    try:
        daemon.wait_listening(_TIMEOUT_S)
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=_TIMEOUT_S) as http:
            for name in ("tiny@0", "tiny@1", "single"):
                until(http, name, lambda s: s["state"] == "ready")
            rolls, singles, windows = [], [], []
            with steady_load(url, senders) as load:
                for _ in range(rounds):
                    began = time.perf_counter()
                    report = http.post("/instances/tiny/restart").json()
                    windows.append((began, time.perf_counter()))
                    if report.get("stopped_at") is not None:
                        raise RuntimeError(f"the roll stopped: {report}")
                    rolls.append(windows[-1][1] - began)
                    pid = http.get("/instances/single").json()["pid"]
                    began = time.perf_counter()
                    http.post("/instances/single/restart")
                    until(http, "single", ready_with_a_new_pid(pid))
                    singles.append(time.perf_counter() - began)
            return rolls, singles, load, windows
    finally:
        daemon.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--senders", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        rolls, singles, load, windows = measure(args.rounds, args.senders, Path(tmp_name))
    during, failed = load.failed_within(windows)
    roll_ms, single_ms = statistics.median(rolls) * 1000, statistics.median(singles) * 1000
    print(f"{args.rounds} rolls of 2 replicas under {args.senders} senders, tiny model ({os.cpu_count()} cores):")
    print("| | median | max |")
    print("|---|---|---|")
    print(f"| rolling restart of 2 replicas (POST restart -> rolled) | {roll_ms:.0f} ms | {max(rolls) * 1000:.0f} ms |")
    print(f"| baseline: one instance, POST restart -> ready | {single_ms:.0f} ms | {max(singles) * 1000:.0f} ms |")
    print(f"ratio roll / single restart: {roll_ms / single_ms:.2f}")
    print(f"requests during the rolls: {during}, failed: {failed} (all run: {len(load.spans)}, failed: ", end="")
    print(f"{sum(f for _b, _e, f in load.spans)})")


if __name__ == "__main__":
    main()
