"""Time to ready: bare llama-server vs `launcher up`, and the restart after `kill -9`.

Usage: .venv/bin/python bench/startup.py [--runs N]

All figures come from the same run on the same model (the generated demo model), so they compare:
- bare: spawn llama-server with the launcher's own command line, poll /health every 5 ms until 200;
- manager: the supervision core in process, start -> ready (what the daemon itself adds);
- cli up: `launcher up demo` against a running daemon, wall time of the whole command;
- kill -9: from SIGKILL of a ready server to the next one ready (in process, event-driven).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from launcher.backends.llama_server import LlamaServerBackend
from launcher.config_file import load_settings
from launcher.config_yaml import dump_config_yaml
from launcher.plan.placement import Placement
from launcher.schema_instances import State
from launcher.supervise.instance import Instance
from launcher.supervise.ports import pick_free_port
from launcher.tinymodel import write_tiny_llama
from launcher.wiring import supervision


def bare_once(argv: list[str], port: int) -> float:
    client = httpx.Client(verify=False)  # made before the clock starts: only the server is timed
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                if client.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return time.perf_counter() - start
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError("llama-server exited")
            time.sleep(0.005)
    finally:
        proc.terminate()
        proc.wait()
        client.close()


def ready(instance: Instance) -> bool:
    return instance.state == State.READY


def restarted_past(count: int) -> Callable[[Instance], bool]:
    return lambda i: i.restarts > count and ready(i)


async def manager_runs(config: Path, runs: int) -> tuple[list[float], list[float]]:
    async with supervision(load_settings(config), lambda _event: None) as wired:
        manager = wired.manager
        instance = manager.get("demo")
        starts, restarts = [], []
        for _ in range(runs):
            t0 = time.perf_counter()
            await manager.start("demo")
            await instance.wait_until(ready, 60)
            starts.append(time.perf_counter() - t0)
            await manager.stop("demo")
        await manager.start("demo")
        await instance.wait_until(ready, 60)
        for _ in range(runs):
            count = instance.restarts
            pid = instance.status().pid
            assert pid is not None
            t0 = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            await instance.wait_until(restarted_past(count), 60)
            restarts.append(time.perf_counter() - t0)
    return starts, restarts


def cli_runs(config: Path, runs: int) -> list[float]:
    launcher = [sys.executable, "-m", "launcher", "--config", str(config)]
    daemon = subprocess.Popen([*launcher, "serve"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert daemon.stdout is not None
    for line in daemon.stdout:
        if "listening on" in line:
            break
    times = []
    try:
        for _ in range(runs):
            t0 = time.perf_counter()
            subprocess.run([*launcher, "up", "demo"], check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
            subprocess.run([*launcher, "down", "demo"], check=True, capture_output=True)
    finally:
        daemon.terminate()
        daemon.wait()
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=9)
    runs = parser.parse_args().runs
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_llama(Path(tmp) / "demo.gguf")
        model_kib = model.stat().st_size // 1024
        config = Path(tmp) / "launcher.yaml"
        port = pick_free_port(18400, 18499, [])
        config.write_text(
            dump_config_yaml(
                {
                    "daemon": {"port": port, "state_dir": str(Path(tmp) / "state"), "instance_ports": [18500, 18599]},
                    "models": {
                        "demo": {"model": str(model), "ctx": 2048, "restart": {"burst": 1000, "reset_after": 0}}
                    },
                }
            )
        )
        settings = load_settings(config)
        bare_port = pick_free_port(18600, 18699, [])
        spec = LlamaServerBackend(settings.models["demo"]).launch_spec(settings.models["demo"], bare_port, Placement())
        bare = [bare_once(spec.argv, bare_port) for _ in range(runs)]
        starts, restarts = asyncio.run(manager_runs(config, runs))
        cli = cli_runs(config, runs)

    base = statistics.median(bare)
    print(f"runs: {runs} each, model {model.name} ({model_kib} KiB), {os.cpu_count()} cores")
    print("| measure | median ms | min ms | max ms | vs bare |")
    print("|---|---|---|---|---|")
    for label, values in (
        ("bare llama-server to first 200 on /health", bare),
        ("launcher, in process: start -> ready", starts),
        ("`launcher up demo` via daemon (whole command)", cli),
        ("kill -9 -> ready again (restart)", restarts),
    ):
        med = statistics.median(values)
        print(
            f"| {label} | {med * 1000:.0f} | {min(values) * 1000:.0f} | {max(values) * 1000:.0f} | {med / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
