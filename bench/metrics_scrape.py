"""The cost of a scrape of the daemon's /metrics: 8 simulated GPUs (two NVLink groups of 4, with scripted
traffic) and 4 real llama-server instances whose own series are re-exported. Scrapes back to back, p50 and
p99 of their latency and the daemon's CPU per scrape (its CPU over the scrapes, less its idle CPU over as
long), against GET /gpus (the 8 GPUs as JSON) on the same daemon as the baseline; then the same with every llama-server
frozen (SIGSTOP): a scrape reads the cache and never waits on a server, so its figures stay the same.

Usage: .venv/bin/python -m bench.metrics_scrape [--scrapes 500]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

from launcher.config_yaml import dump_config_yaml
from launcher.supervise.ports import pick_free_port
from launcher.tinymodel import write_tiny_llama

GPUS = 8
INSTANCES = 4


@contextmanager
def daemon(tmp: Path) -> Iterator[tuple[psutil.Process, str]]:
    model = write_tiny_llama(tmp / "tiny.gguf")
    sim = [
        {"name": f"Sim GPU {i}", "memory_mib": 24576, "link_group": f"nv{i // 4}", "link_tx_mib_per_s": 100 + i}
        | {"pcie_tx_mib_per_s": 10 * i, "pcie_rx_mib_per_s": 5 * i}
        for i in range(GPUS)
    ]
    models = {f"m{i}": {"model": str(model), "ctx": 256, "autostart": True} for i in range(INSTANCES)}
    port = pick_free_port(18700, 18799, [])
    config = tmp / "launcher.yaml"
    settings = {"daemon": {"port": port, "state_dir": str(tmp / "state")}, "models": models}
    config.write_text(dump_config_yaml({**settings, "gpus": {"backend": "sim", "poll_interval": 1.0, "sim": sim}}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "--config", str(config), "serve"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                states = [i["state"] for i in httpx.get(f"{url}/instances", timeout=2).json()]
                if states.count("ready") == INSTANCES:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError("the instances did not get ready")
        time.sleep(2)  # a round of reads of the servers' /metrics done: the cache is full
        yield psutil.Process(proc.pid), url
    finally:
        proc.terminate()
        proc.wait(60)


def timed(http: httpx.Client, path: str, count: int, daemon_proc: psutil.Process) -> tuple[list[float], float]:
    """Latencies (ms) of ``count`` GETs of ``path`` back to back, and the daemon's CPU seconds over them."""
    begin = daemon_proc.cpu_times()
    latencies = []
    for _ in range(count):
        start = time.perf_counter()
        answer = http.get(path)
        latencies.append((time.perf_counter() - start) * 1000)
        assert answer.status_code == 200
    end = daemon_proc.cpu_times()
    return latencies, (end.user + end.system) - (begin.user + begin.system)


def idle_cpu_s(daemon_proc: psutil.Process, seconds: float) -> float:
    begin = daemon_proc.cpu_times()
    time.sleep(seconds)
    end = daemon_proc.cpu_times()
    return (end.user + end.system) - (begin.user + begin.system)


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scrapes", type=int, default=500)
    count = parser.parse_args().scrapes
    with tempfile.TemporaryDirectory() as tmp, daemon(Path(tmp)) as (proc, url), httpx.Client(base_url=url) as http:
        servers = [c for c in proc.children(recursive=True) if "llama-server" in c.name()]
        text = http.get("/metrics").text
        series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
        print(f"/metrics: {len(text)} bytes, {series} series ({len(servers)} llama-servers re-exported)")
        timed(http, "/metrics", 20, proc)  # warm up
        rows = []
        for phase, frozen in (("servers running", False), ("servers frozen (SIGSTOP)", True)):
            for server in servers if frozen else []:
                os.kill(server.pid, signal.SIGSTOP)
            try:
                health, _ = timed(http, "/gpus", count, proc)
                scrapes, cpu_s = timed(http, "/metrics", count, proc)
                idle_s = idle_cpu_s(proc, sum(scrapes) / 1000)
            finally:
                for server in servers if frozen else []:
                    with contextlib.suppress(ProcessLookupError):  # the daemon restarted it: unhealthy too long
                        os.kill(server.pid, signal.SIGCONT)
            cpu_ms = max(0.0, cpu_s - idle_s) / count * 1000
            states = sorted({i["state"] for i in http.get("/instances").json()})
            phase += f", instances {'/'.join(states)} after"
            rows.append((phase, statistics.median(scrapes), p99(scrapes), cpu_ms, statistics.median(health)))
        print(f"{count} scrapes each, {GPUS} simulated GPUs, {INSTANCES} llama-server instances")
        print("| phase | /metrics p50 ms | /metrics p99 ms | daemon CPU ms per scrape | /gpus p50 ms | ratio p50 |")
        print("|---|---|---|---|---|---|")
        for phase, p50, high, cpu_ms, health_p50 in rows:
            print(f"| {phase} | {p50:.2f} | {high:.2f} | {cpu_ms:.2f} | {health_p50:.2f} | {p50 / health_p50:.1f}x |")


if __name__ == "__main__":
    main()
