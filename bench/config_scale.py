"""Many models: loading the configuration, starting the daemon and `launcher status`, at 1,000, 5,000 and
20,000 configured models (none started).

Usage: .venv/bin/python -m bench.config_scale [--runs N] [--counts 1000,5000,20000]

Each figure is the median of N runs, beside its cost per 1,000 models and that cost's ratio to the smallest
count's in the same run: a linear path stays near 1.0x, a quadratic one grows with the count (issue 20:
20,000 models took 182 s to start, the router asking each model's instances of a scan of them all).
- load: `load_settings` in this process (YAML, validation, path resolution);
- serve: `launcher serve` from its start to its "listening on" line;
- status: the whole `launcher status` command against that daemon (the CLI reads only the daemon section).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from launcher.config_file import load_settings
from launcher.supervise.ports import pick_free_port

TIMEOUT_S = 600.0


def write_config(folder: Path, count: int, port: int) -> Path:
    path = folder / f"launcher-{count}.yaml"
    models = "".join(f"  m{i:05d}: {{model: m.gguf, ctx: 256}}\n" for i in range(count))
    path.write_text(f"daemon: {{port: {port}, state_dir: state-{count}}}\ngpus: {{backend: none}}\nmodels:\n{models}")
    return path


def load_once(config: Path) -> float:
    start = time.perf_counter()
    load_settings(config)
    return time.perf_counter() - start


def serve_and_status(config: Path, runs: int) -> tuple[float, list[float]]:
    """Seconds to "listening on", and each `launcher status`'s wall time against that daemon."""
    start = time.perf_counter()
    daemon = subprocess.Popen(
        [sys.executable, "-m", "launcher", "--config", str(config), "serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert daemon.stdout is not None
        for line in daemon.stdout:
            if "listening on" in line:
                break
        else:
            raise SystemExit(f"the daemon exited with {daemon.wait()} before listening")
        serve_s = time.perf_counter() - start
        statuses = []
        for _ in range(runs):
            begin = time.perf_counter()
            result = subprocess.run(
                [sys.executable, "-m", "launcher", "--config", str(config), "status"],
                capture_output=True,
                text=True,
                timeout=TIMEOUT_S,
            )
            statuses.append(time.perf_counter() - begin)
            if result.returncode != 0:
                raise SystemExit(f"launcher status: {result.stderr}")
        return serve_s, statuses
    finally:
        daemon.terminate()
        daemon.wait(TIMEOUT_S)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--counts", default="1000,5000,20000")
    args = parser.parse_args()
    counts = sorted(int(c) for c in args.counts.split(","))
    figures: dict[str, dict[int, float]] = {"load": {}, "serve": {}, "status": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for count in counts:
            config = write_config(Path(tmp), count, pick_free_port(18400, 18499, []))
            figures["load"][count] = statistics.median(load_once(config) for _ in range(args.runs))
            serves, statuses = [], []
            for _ in range(args.runs):
                serve_s, status_s = serve_and_status(config, 1)
                serves.append(serve_s)
                statuses += status_s
            figures["serve"][count] = statistics.median(serves)
            figures["status"][count] = statistics.median(statuses)

    print(f"runs: {args.runs} each, {os.cpu_count()} cores")
    print("| measure | models | median s | s per 1,000 models | vs the smallest count |")
    print("|---|---|---|---|---|")
    for measure, by_count in figures.items():
        base = by_count[counts[0]] / counts[0]
        for count in counts:
            per_model = by_count[count] / count
            print(
                f"| {measure} | {count:,} | {by_count[count]:.2f} | {per_model * 1000:.3f} | {per_model / base:.2f}x |"
            )


if __name__ == "__main__":
    main()
