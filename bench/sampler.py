"""Daemon CPU and RSS while sampling 8 simulated GPUs at 1 Hz, against the same daemon with no GPU.

Usage: .venv/bin/python bench/sampler.py [--seconds 60]

Both daemons run side by side for the same minute (no model started), so the difference is what the
sampler, its history and the thermal guard cost.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from launcher.config_yaml import dump_config_yaml
from launcher.supervise.ports import pick_free_port


def start(tmp: Path, name: str, gpus: dict[str, object], port: int) -> subprocess.Popen[str]:
    config = tmp / f"{name}.yaml"
    config.write_text(dump_config_yaml({"daemon": {"port": port, "state_dir": str(tmp / name)}, "gpus": gpus}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "--config", str(config), "serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "listening on" in line:
            return proc
    raise RuntimeError(f"{name} daemon did not start")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60)
    seconds = parser.parse_args().seconds
    sim = [{"name": f"Sim GPU {i}", "memory_mib": 24576, "temperature_c": 50 + i} for i in range(8)]
    with tempfile.TemporaryDirectory() as tmp:
        ports = [pick_free_port(18700, 18799, []), 0]
        ports[1] = pick_free_port(18700, 18799, [ports[0]])
        daemons = {
            "8 sim GPUs at 1 Hz": start(
                Path(tmp), "sim", {"backend": "sim", "poll_interval": 1.0, "sim": sim}, ports[0]
            ),
            "no GPU (baseline)": start(Path(tmp), "none", {"backend": "none"}, ports[1]),
        }
        procs = {name: psutil.Process(p.pid) for name, p in daemons.items()}
        begin = {name: p.cpu_times() for name, p in procs.items()}
        rss: dict[str, list[float]] = {name: [] for name in procs}
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for name, p in procs.items():
                rss[name].append(p.memory_info().rss / 2**20)
            time.sleep(1)
        end = {name: p.cpu_times() for name, p in procs.items()}
        for daemon in daemons.values():
            daemon.terminate()
            daemon.wait()
    print(f"{seconds:.0f} s side by side, RSS sampled once a second")
    print("| daemon | CPU s | CPU % of one core | RSS median MiB | RSS max MiB |")
    print("|---|---|---|---|---|")
    for name in procs:
        cpu = (end[name].user + end[name].system) - (begin[name].user + begin[name].system)
        print(
            f"| {name} | {cpu:.2f} | {100 * cpu / seconds:.2f} | "
            f"{statistics.median(rss[name]):.1f} | {max(rss[name]):.1f} |"
        )


if __name__ == "__main__":
    main()
