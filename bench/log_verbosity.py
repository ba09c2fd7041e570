"""What llama-server's `-lv 4` (the verbosity at which this llama.cpp logs its buffer sizes) costs against
its default: log lines and bytes at load and per request, and the request latency (medians, same run).

    python -m bench.log_verbosity [--requests 40]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from bench.realbuffers import free_port
from launcher.backends.llama_server import find_llama_server
from launcher.tinymodel import write_tiny_llama


@contextlib.contextmanager
def serving(binary: Path, model: Path, extra: list[str], log: Path) -> Iterator[httpx.Client]:
    """llama-server on ``model`` (ctx 4096, ``extra`` args), its output appended to ``log``, once ready
    (within 60 s); a client of it, and the server ended after."""
    port = free_port()
    argv = [str(binary), "--model", str(model), "--port", str(port), "--ctx-size", "4096", *extra]
    with log.open("ab") as out, subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT) as proc:
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    with contextlib.suppress(httpx.HTTPError):
                        if client.get("/health").status_code == 200:
                            break
                    time.sleep(0.05)
                yield client
        finally:
            proc.terminate()
            proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=60)
    args = parser.parse_args()
    binary = find_llama_server(None)
    sides = {"default": [], "-lv 4": ["-lv", "4"]}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        model = write_tiny_llama(Path(tmp) / "tiny.gguf")
        log = {label: Path(tmp) / f"{i}.log" for i, label in enumerate(sides)}
        client = {
            label: stack.enter_context(serving(binary, model, extra, log[label])) for label, extra in sides.items()
        }
        loaded = {label: (len(log[label].read_bytes().splitlines()), log[label].stat().st_size) for label in sides}
        # Both servers run at once and take the requests in turn, which goes first alternating: a busy machine
        # slows both alike.
        latencies: dict[str, list[float]] = {label: [] for label in sides}
        for i in range(args.requests):
            for label in list(sides)[:: 1 if i % 2 else -1]:
                began = time.perf_counter()
                body = {"prompt": f"request {i}", "n_predict": 8, "cache_prompt": False}
                client[label].post("/completion", json=body).raise_for_status()
                latencies[label].append(time.perf_counter() - began)
        ended = {label: (len(log[label].read_bytes().splitlines()), log[label].stat().st_size) for label in sides}
    print("| verbosity | load lines | load KiB | lines/request | bytes/request | median ms/request |")
    print("|---|---|---|---|---|---|")
    for label in sides:
        (lines0, bytes0), (lines1, bytes1) = loaded[label], ended[label]
        print(
            f"| {label} | {lines0} | {bytes0 / 1024:.1f} | {(lines1 - lines0) / args.requests:.1f} "
            f"| {(bytes1 - bytes0) / args.requests:.0f} | {statistics.median(latencies[label]) * 1000:.2f} |"
        )
    ratios = [lv4 / default for default, lv4 in zip(latencies["default"], latencies["-lv 4"], strict=True)]
    print(f"latency ratio -lv 4 / default, median of the {args.requests} pairs: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
