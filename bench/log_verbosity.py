"""What llama-server's `-lv 4` (the verbosity at which this llama.cpp logs its buffer sizes) costs against
its default: log lines and bytes at load and per request, and the request latency (medians, same run).

    python -m bench.log_verbosity [--requests 40]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from bench.realbuffers import free_port
from launcher.backends.llama_server import find_llama_server
from launcher.tinymodel import write_tiny_llama


def _run(binary: Path, model: Path, extra: list[str], requests: int, log: Path) -> dict[str, float]:
    port = free_port()
    argv = [str(binary), "--model", str(model), "--port", str(port), "--ctx-size", "512", *extra]
    with log.open("wb") as out, subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT) as proc:
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    try:
                        if client.get("/health").status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.05)
                loaded_lines, loaded_bytes = len(log.read_bytes().splitlines()), log.stat().st_size
                latencies = []
                for i in range(requests):
                    began = time.perf_counter()
                    body = {"prompt": f"request {i}", "n_predict": 8, "cache_prompt": False}
                    client.post("/completion", json=body).raise_for_status()
                    latencies.append(time.perf_counter() - began)
        finally:
            proc.terminate()
            proc.wait(10)
    lines, size = len(log.read_bytes().splitlines()), log.stat().st_size
    return {
        "load_lines": loaded_lines,
        "load_bytes": loaded_bytes,
        "lines_per_request": (lines - loaded_lines) / requests,
        "bytes_per_request": (size - loaded_bytes) / requests,
        "median_ms": statistics.median(latencies) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=40)
    args = parser.parse_args()
    binary = find_llama_server(None)
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_llama(Path(tmp) / "tiny.gguf")
        # Alternated, twice each: the medians of both runs, so a machine busy during one run skews neither.
        runs: dict[str, list[dict[str, float]]] = {"default": [], "-lv 4": []}
        for _ in range(2):
            for label, extra in (("default", []), ("-lv 4", ["-lv", "4"])):
                runs[label].append(_run(binary, model, extra, args.requests, Path(tmp) / f"{label}.log"))
        rows = {label: {k: statistics.median(r[k] for r in each) for k in each[0]} for label, each in runs.items()}
    print("| verbosity | load lines | load KiB | lines/request | bytes/request | median ms/request |")
    print("|---|---|---|---|---|---|")
    for label, r in rows.items():
        print(
            f"| {label} | {r['load_lines']:.0f} | {r['load_bytes'] / 1024:.1f} | {r['lines_per_request']:.1f} "
            f"| {r['bytes_per_request']:.0f} | {r['median_ms']:.2f} |"
        )
    ratio = rows["-lv 4"]["median_ms"] / rows["default"]["median_ms"]
    print(f"latency ratio -lv 4 / default: {ratio:.3f}")


if __name__ == "__main__":
    main()
