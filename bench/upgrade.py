"""Upgrade in place with a real daemon (`launcher serve`) and real llama-servers on a tiny model: the longest
the API leaves a request unanswered during an upgrade (SIGUSR2), while a client asks `/health` and
`/v1/models` without pause, each on a new connection; and the models loaded again by it (target 0: the
same server pids after it). Baselines in the same run: the longest gap over 2 s without an upgrade just
before each (what the host's load alone costs the client), and a restart of the daemon (SIGTERM, then
`serve` again), whose gap runs until every model is ready again.

Usage: .venv/bin/python bench/upgrade.py [--rounds 10] [--log FILE]
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

import httpx

from launcher.config_yaml import dump_config_yaml
from launcher.tinymodel import write_tiny_llama

_TIMEOUT_S = 60.0
_QUIET_S = 2.0
_NAMES = ("one", "two")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write(path: Path, port: int, model: Path) -> None:
    entry = {"model": str(model), "autostart": True, "port": "auto", "ctx": 256}
    daemon = {"port": port, "state_dir": str(path.parent / "state"), "instance_ports": [28700, 28799]}
    models = {name: entry for name in _NAMES}
    path.write_text(dump_config_yaml({"daemon": daemon, "gpus": {"backend": "none"}, "models": models}))


class Hammer:
    """Asks /health and /v1/models in turn, each on a new connection, and keeps when each answer came and
    how long it took; a refused or failed request is counted."""

    def __init__(self, port: int) -> None:
        self._port = port
        self.answers: list[tuple[float, float]] = []  # (sent, answered), perf_counter seconds
        self.failed: list[tuple[float, str]] = []  # (when, what): refused or failed requests
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Hammer:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        paths = ("/health", "/v1/models")
        n = 0
        while not self._stop.is_set():
            sent = time.perf_counter()
            conn = http.client.HTTPConnection("127.0.0.1", self._port, timeout=30)
            try:
                conn.request("GET", paths[n % 2])
                conn.getresponse().read()
                self.answers.append((sent, time.perf_counter()))
            except (OSError, http.client.HTTPException) as exc:
                self.failed.append((time.perf_counter(), type(exc).__name__))
                time.sleep(0.001)
            finally:
                conn.close()
            n += 1

    def longest_gap_s(self, since: float, until: float) -> float:
        """The longest time between ``since`` and ``until`` during which no request got its answer: between
        consecutive answers, or a request's whole wait."""
        times = sorted(answered for _, answered in self.answers if since <= answered <= until)
        waits = [answered - sent for sent, answered in self.answers if since <= answered <= until]
        steps = [b - a for a, b in itertools.pairwise(times)]
        return max([*steps, *waits, 0.0])

    def failures(self, since: float, until: float) -> int:
        return sum(since <= when <= until for when, _ in self.failed)

    def answered_after(self, moment: float, count: int) -> None:
        deadline = time.monotonic() + _TIMEOUT_S
        while sum(answered > moment for _, answered in self.answers) < count:
            if time.monotonic() > deadline:
                raise TimeoutError("the daemon stopped answering")
            time.sleep(0.01)


def start(config: Path, log: IO[bytes]) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "launcher", "--config", str(config), "serve"]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def pids(http: httpx.Client) -> dict[str, Any]:
    deadline = time.monotonic() + _TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            statuses = http.get("/instances").json()
            if all(s["state"] == "ready" for s in statuses):
                return {s["name"]: s["pid"] for s in statuses}
        except httpx.TransportError:
            pass
        time.sleep(0.02)
    raise TimeoutError("the models did not get ready")


def program(http: httpx.Client) -> float | None:
    try:
        value: float = http.get("/health").json()["program_started_at"]
        return value
    except httpx.TransportError:
        return None


def measure(rounds: int, tmp: Path, log: IO[bytes]) -> dict[str, list[Any]]:
    model, config, port = write_tiny_llama(tmp / "m.gguf"), tmp / "launcher.yaml", free_port()
    write(config, port, model)
    daemon = start(config, log)
    keys = ("gap", "reloaded", "failures")
    found: dict[str, list[Any]] = {f"{what}_{key}": [] for what in ("upgrade", "restart") for key in keys}
    found["upgrade_kinds"], found["quiet_gap"] = [], []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http, Hammer(port) as hammer:
            before = pids(http)
            for _ in range(rounds):
                started_at = program(http)
                hammer.answered_after(time.perf_counter(), 20)
                quiet_began = time.perf_counter()
                time.sleep(_QUIET_S)
                found["quiet_gap"].append(hammer.longest_gap_s(quiet_began, time.perf_counter()))
                began = time.perf_counter()
                os.kill(daemon.pid, signal.SIGUSR2)
                deadline = time.monotonic() + _TIMEOUT_S
                while program(http) in (None, started_at) and time.monotonic() < deadline:
                    time.sleep(0.01)
                after = pids(http)
                ended = time.perf_counter()
                hammer.answered_after(ended, 20)
                found["upgrade_gap"].append(hammer.longest_gap_s(began, time.perf_counter()))
                found["upgrade_reloaded"].append(sum(after[n] != before[n] for n in _NAMES))
                found["upgrade_failures"].append(hammer.failures(began, time.perf_counter()))
                found["upgrade_kinds"].extend(what for when, what in hammer.failed if began <= when)
                before = after
            for _ in range(max(1, rounds // 3)):  # the baseline: a restart of the daemon
                began = time.perf_counter()
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(60)
                daemon = start(config, log)
                after = pids(http)
                hammer.answered_after(time.perf_counter(), 20)
                found["restart_gap"].append(hammer.longest_gap_s(began, time.perf_counter()))
                found["restart_reloaded"].append(sum(after[n] != before[n] for n in _NAMES))
                found["restart_failures"].append(hammer.failures(began, time.perf_counter()))
                before = after
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--log", type=Path, help="keep the daemon's log here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        log_path = args.log or Path(tmp_name) / "daemon.log"
        with log_path.open("wb") as log:
            found = measure(args.rounds, Path(tmp_name), log)
    upgrade_ms = statistics.median(found["upgrade_gap"]) * 1000
    restart_ms = statistics.median(found["restart_gap"]) * 1000
    print(f"{args.rounds} upgrades of a daemon with 2 tiny models ({os.cpu_count()} cores):")
    print("| | longest gap, median | max | models loaded again, median | refused or failed requests, total |")
    print("|---|---|---|---|---|")
    for what, key in (("upgrade (SIGUSR2)", "upgrade"), ("baseline: restart of the daemon", "restart")):
        gaps, reloaded = found[f"{key}_gap"], found[f"{key}_reloaded"]
        print(
            f"| {what} | {statistics.median(gaps) * 1000:.0f} ms | {max(gaps) * 1000:.0f} ms "
            f"| {statistics.median(reloaded):g} | {sum(found[f'{key}_failures']):g} |"
        )
    quiet_ms = [gap * 1000 for gap in found["quiet_gap"]]
    print(
        f"| baseline: no upgrade, {_QUIET_S:g} s | {statistics.median(quiet_ms):.0f} ms | {max(quiet_ms):.0f} ms | | |"
    )
    print(f"ratio upgrade / restart (longest gap): {upgrade_ms / restart_ms:.2f}")
    if found["upgrade_kinds"]:
        print(f"failed during the upgrades: {found['upgrade_kinds']}")


if __name__ == "__main__":
    main()
