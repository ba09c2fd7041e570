"""Supervision timings: kill -9 to the replacement spawned (and ready), SIGSTOP to the replacement ready,
and the backoff schedule of a crash loop as observed.

Usage: .venv/bin/python bench/supervision.py [--kills 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from launcher.config_file import load_settings
from launcher.config_yaml import dump_config_yaml
from launcher.schema_instances import State
from launcher.supervise.instance import Instance
from launcher.tinymodel import write_tiny_llama
from launcher.wiring import supervision

STANDIN = Path(__file__).resolve().parent.parent / "tests" / "standin" / "llama.py"


def stamp(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def config(tmp: Path, models: dict[str, dict[str, object]]) -> Path:
    path = tmp / "launcher.yaml"
    path.write_text(dump_config_yaml({"daemon": {"state_dir": str(tmp / "state"), "port": 18480}, "models": models}))
    return path


def ready_after(count: int) -> object:
    return lambda i: i.restarts >= count and i.state == State.READY


async def kills(tmp: Path, model: Path, count: int) -> tuple[list[float], list[float]]:
    restart = {"backoff_initial": 0.01, "backoff_max": 0.05, "burst": 1000, "reset_after": 0}
    async with supervision(
        load_settings(config(tmp, {"m": {"model": str(model), "ctx": 512, "restart": restart}})), lambda _event: None
    ) as wired:
        manager = wired.manager
        instance: Instance = manager.get("m")
        spawned, ready = [], []
        await manager.start("m")
        await instance.wait_until(lambda i: i.state == State.READY, 30)
        for n in range(count):
            pid = instance.status().pid
            assert pid is not None
            killed = time.time()
            os.kill(pid, signal.SIGKILL)
            await instance.wait_until(ready_after(n + 1), 30)  # type: ignore[arg-type]
            ready.append(time.time() - killed)
            loading = [e for e in instance.events if e.state == State.LOADING][-1]
            spawned.append(stamp(loading.time) - killed)
    return spawned, ready


async def hang(tmp: Path, model: Path) -> float:
    health = {"interval": 0.5, "timeout": 0.5, "failures": 3}
    models: dict[str, dict[str, object]] = {"m": {"model": str(model), "ctx": 512, "health": health}}
    async with supervision(load_settings(config(tmp, models)), lambda _event: None) as wired:
        manager = wired.manager
        instance = manager.get("m")
        await manager.start("m")
        await instance.wait_until(lambda i: i.state == State.READY, 30)
        pid = instance.status().pid
        assert pid is not None
        began = time.time()
        os.kill(pid, signal.SIGSTOP)
        await instance.wait_until(ready_after(1), 60)  # type: ignore[arg-type]
        return time.time() - began


async def backoff(tmp: Path, model: Path) -> list[float]:
    binary = tmp / "standin"
    binary.write_text(f'#!/bin/sh\nexec {sys.executable} {STANDIN} "$@"\n')
    binary.chmod(0o755)
    restart = {"backoff_initial": 0.1, "backoff_max": 1.6, "burst": 7, "interval": 120}
    models: dict[str, dict[str, object]] = {
        "m": {"model": str(model), "binary": str(binary), "restart": restart, "env": {"STANDIN_CRASH_AT_START": "1"}}
    }
    async with supervision(load_settings(config(tmp, models)), lambda _event: None) as wired:
        manager = wired.manager
        instance = manager.get("m")
        await manager.start("m")
        await instance.wait_until(lambda i: i.state == State.FAILED, 60)
        events = list(instance.events)
    exits = [stamp(e.time) for e in events if e.kind == "exit"]
    spawns = [stamp(e.time) for e in events if e.state == State.LOADING and e.kind == "state"]
    return [start - end for end, start in zip(exits, spawns[1:], strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=50)
    count = parser.parse_args().kills
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = write_tiny_llama(tmp / "m.gguf")
        spawned, ready = asyncio.run(kills(tmp, model, count))
        stopped = asyncio.run(hang(tmp, model))
        delays = asyncio.run(backoff(tmp, model))
    ms = [f"{statistics.median(v) * 1000:.1f}" for v in (spawned, ready)]
    print(f"kill -9 of a ready llama-server, {count} times in a row (2 cores, tiny model):")
    print(f"| kill -9 -> replacement spawned | median {ms[0]} ms | max {max(spawned) * 1000:.1f} ms |")
    print(f"| kill -9 -> replacement ready | median {ms[1]} ms | max {max(ready) * 1000:.1f} ms |")
    print(f"SIGSTOP -> replacement ready (health interval 0.5 s, timeout 0.5 s, 3 failures): {stopped:.2f} s")
    print("crash loop (backoff_initial 0.1, backoff_max 1.6, burst 7): exit -> next spawn, s:")
    print("  " + ", ".join(f"{d:.2f}" for d in delays) + " -> failed")


if __name__ == "__main__":
    main()
