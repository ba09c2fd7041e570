"""The launcher on a real NVIDIA GPU (issue 27), in one run: NVML against nvidia-smi, tests/test_gpu_real.py,
the planner against CUDA's buffers, VRAM coming back after kill -9, and the product on the card.

Usage: python -m bench.gpu --server PATH/llama-server --report FILE --logs DIR [--rehearse] [--budget-s S]

Without an NVIDIA GPU (or with --rehearse) it rehearses every step against a simulated GPU and the CPU
llama-server, with small models: the report then says REHEARSAL and is no measurement. scripts/gpu-check
runs it (on the device: after building the CUDA server); bench/gpu-latest.md is its report there.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from bench import gpu_buffers, gpu_smi
from bench.gpu_buffers import Setup
from bench.realbuffers import free_port
from launcher.config_gpus import GpuSettings
from launcher.gpu import open_backend
from launcher.tinymodel import TinyShape

ROOT = Path(__file__).resolve().parent.parent
# A few GiB each on the card (zeros: a sparse file); the rehearsal's are a few MiB for the CPU.
REAL_SHAPES = {
    "gqa 3B q8_0": TinyShape(
        n_layer=28, n_embd=3072, n_head=24, n_head_kv=8, n_ff=8192, extra_tokens=32000, weight_type="q8_0"
    ),
    "gqa 1B f16": TinyShape(n_layer=16, n_embd=2048, n_head=32, n_head_kv=8, n_ff=8192, extra_tokens=32000),
    "mha hd128 q8_0": TinyShape(
        n_layer=24, n_embd=2048, n_head=16, n_head_kv=16, n_ff=5632, extra_tokens=32000, weight_type="q8_0"
    ),
}
REHEARSAL_SHAPES = {
    "gqa f16 hd32": TinyShape(n_layer=8, n_embd=256, n_head=8, n_head_kv=2, n_ff=512, extra_tokens=5000),
    "mha q8_0 hd64": TinyShape(n_layer=6, n_embd=512, n_head=8, n_head_kv=8, n_ff=1024, weight_type="q8_0"),
}


# The product's model on the card: 7B-like (about 7 GiB of zeros to read: the slow part of a load) with a
# context whose KV cache fills the GPU to about 80 %; on the rehearsal's CPU, about 200 MiB at 8k.
FILLER = TinyShape(
    n_layer=32,
    n_embd=4096,
    n_head=32,
    n_head_kv=32,
    n_ff=11008,
    extra_tokens=32000,
    weight_type="q8_0",
    context_length=1 << 20,
)
REHEARSAL_FILLER = TinyShape(n_layer=12, n_embd=1024, n_head=16, n_head_kv=4, n_ff=4096, weight_type="q8_0")


def filling(total_mib: int, real: bool) -> tuple[TinyShape, int]:
    """The product step's model and context for a GPU of ``total_mib``."""
    if not real:
        return REHEARSAL_FILLER, 8192
    s = FILLER
    e, kv_dim = s.n_embd, s.dim_head * s.n_head_kv
    params = s.n_layer * (2 * e * e + 2 * e * kv_dim + 3 * e * s.n_ff) + 2 * s.n_vocab * e
    weights_mib = params * 34 / 32 / 2**20  # q8_0: 34 bytes per 32 weights
    kv_mib_per_token = 2 * s.n_layer * kv_dim * 2 / 2**20  # K and V, f16
    # What is left of 80 % after the weights, 2 GiB for compute buffers and the driver.
    ctx = int((0.8 * total_mib - weights_mib - 2048) / kv_mib_per_token) // 256 * 256
    return s, max(ctx, 8192)


def nvml_vs_smi(setup: Setup) -> list[str]:
    reading = setup.backend.read(0, processes=False)
    # nvidia-smi read right after NVML; the rehearsal prints what the tool would from the same reading.
    line = gpu_smi.query(0).strip() if setup.real else gpu_smi.smi_line_of(reading)
    (setup.logs / "nvidia-smi.txt").write_text(
        (subprocess.run(["nvidia-smi", "-q"], capture_output=True, text=True, timeout=60).stdout if setup.real else "")
        + "\n"
        + line
        + "\n"
    )
    return gpu_smi.table(gpu_smi.compare(reading, gpu_smi.parse_gpu_line(line)))


def real_gpu_tests(setup: Setup) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_gpu_real.py", "-q", "-rs", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (setup.logs / "test_gpu_real.txt").write_text(result.stdout + result.stderr)
    return ["```", *result.stdout.strip().splitlines()[-12:], "```"]


def _cli(setup: Setup, config: Path, *args: str, timeout_s: float = 600) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-m", "launcher", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
    )
    with (setup.logs / "product.txt").open("a") as log:
        log.write(f"$ launcher {' '.join(args)}  (exit {result.returncode})\n{result.stdout}{result.stderr}\n")
    return result.returncode, result.stdout + result.stderr


@contextlib.contextmanager
def daemon(setup: Setup, config: Path, url: str) -> Iterator[None]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "--config", str(config), "serve", "--no-autostart"],
        stdout=(setup.logs / "daemon.txt").open("wb"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        _until(lambda: _get(url, "/instances") is not None, 60, "the daemon did not answer")
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _get(url: str, path: str) -> Any:
    with contextlib.suppress(httpx.HTTPError, ValueError):
        response = httpx.get(url + path, timeout=5)
        if response.status_code == 200:
            return response.json()
    return None


def _until(ready: Callable[[], bool], timeout_s: float, what: str) -> float:
    began = time.monotonic()
    while not ready():
        if time.monotonic() - began > timeout_s:
            raise RuntimeError(what)
        time.sleep(0.05)
    return time.monotonic() - began


def stream_tokens_per_s(url: str, tokens: int) -> float:
    """One streamed completion of ``tokens`` tokens: tokens per second from the request to the last one."""
    body = {
        "model": "big",
        "prompt": "Hello",
        "max_tokens": tokens,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0,
    }
    began, chunks = time.monotonic(), 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks += 1
    return chunks / (time.monotonic() - began)


def product(setup: Setup) -> list[str]:
    total = setup.backend.read(0, processes=False).memory_total_mib or 0
    shape, ctx = filling(total, setup.real)
    model = setup.model("big", shape)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = setup.config(
        {"big": {"model": str(model), "ctx": ctx, "args": ["-lv", "4"]}},
        {"port": port},
    )
    lines = [f"model: {model.stat().st_size / 2**30:.1f} GiB of weights on a {total} MiB GPU, ctx {ctx}", ""]
    with daemon(setup, config, url):
        began = time.monotonic()
        code, up = _cli(setup, config, "up", "big")
        if code != 0:
            raise RuntimeError(f"launcher up big: {up.strip()}")
        lines.append(f"`launcher up big`: {time.monotonic() - began:.1f} s")
        outputs = {"up big": up}
        for args in (("gpus",), ("status",), ("status", "big"), ("doctor",)):
            outputs[" ".join(args)] = _cli(setup, config, *args)[1]
        status = _get(url, "/instances/big") or {}
        server = f"http://127.0.0.1:{status.get('port')}"
        tokens, rounds = (128, 5) if setup.real else (8, 3)
        stream_tokens_per_s(server, tokens)  # warm-up: the first request's graphs and buffers
        direct, front = [], []
        for _ in range(rounds):
            direct.append(stream_tokens_per_s(server, tokens))
            front.append(stream_tokens_per_s(url, tokens))
        reading = setup.backend.read(0, processes=False)
        lines += [
            "",
            f"streamed {tokens} tokens, median of {rounds}: direct {statistics.median(direct):.1f} tok/s, front door "
            f"{statistics.median(front):.1f} tok/s (ratio {statistics.median(front) / statistics.median(direct):.3f})",
            f"after it: {reading.temperature_c} °C, {reading.power_w} W of {reading.power_limit_w} W, "
            f"throttle {list(reading.throttle) or 'none'}",
        ]
        # The launcher's own restart after kill -9: its wait for the VRAM included.
        old = status.get("pid")
        if isinstance(old, int):
            os.kill(old, signal.SIGKILL)
            again = _until(
                lambda: (s := _get(url, "/instances/big")) is not None and s["state"] == "ready" and s["pid"] != old,
                300,
                "the launcher did not restart it",
            )
            lines.append(f"kill -9 of its server: ready again after {again:.1f} s (a new pid)")
        _cli(setup, config, "down", "big")
    for command, text in outputs.items():
        lines += ["", f"`launcher {command}`:", "```", *text.strip().splitlines()[:40], "```"]
    return lines


STEPS: list[tuple[str, Callable[[Setup], list[str]], float]] = [
    # (title, step, its share of the time budget). The product's time cannot be cut short: it goes before
    # the two steps that stop adding cases at the end of their share, which take what it leaves.
    ("NVML against nvidia-smi", nvml_vs_smi, 0.02),
    ("tests/test_gpu_real.py", real_gpu_tests, 0.08),
    ("The product on the card", product, 0.30),
    (
        "Planner against CUDA's buffers",
        lambda s: gpu_buffers.planner_vs_cuda(
            s, REAL_SHAPES if s.real else REHEARSAL_SHAPES, (2048, 32768, 8192) if s.real else (2048, 32768)
        ),
        0.45,
    ),
    (
        "VRAM coming back after kill -9",
        lambda s: gpu_buffers.vram_back(
            s, REAL_SHAPES["gqa 1B f16"] if s.real else REHEARSAL_SHAPES["gqa f16 hd32"], 4096
        ),
        0.15,
    ),
]


def header(setup: Setup) -> list[str]:
    identity = setup.backend.identities()[0]
    lines = [f"# {'REHEARSAL (simulated GPU, CPU llama-server): no measurement' if not setup.real else 'Real GPU'}", ""]
    lines.append(f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; host {platform.node()}")
    lines.append(f"- device: {identity.name} ({identity.uuid}, {identity.pci_bus_id})")
    if setup.real:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60).stdout.splitlines()
        lines.append(f"- driver / CUDA: {next((s.strip(' |') for s in smi if 'Driver Version' in s), '?')}")
    version = subprocess.run([str(setup.server), "--version"], capture_output=True, text=True, timeout=60)
    lines.append(f"- llama-server: {setup.server} ({' '.join((version.stdout + version.stderr).split()[:8])})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--server", type=Path, required=True, help="the llama-server to run")
    parser.add_argument("--report", type=Path, required=True, help="where the markdown report goes")
    parser.add_argument("--logs", type=Path, required=True, help="a folder for the raw logs")
    parser.add_argument("--rehearse", action="store_true", help="simulated GPU and small models, even on a GPU")
    parser.add_argument("--budget-s", type=float, default=420, help="time for all the steps together")
    args = parser.parse_args(argv)
    real = not args.rehearse
    gpus: dict[str, Any] = {"backend": "nvml"}
    if real:
        try:
            backend, _ = open_backend(GpuSettings(backend="nvml"))
        except Exception as exc:  # no driver, no GPU: rehearse instead
            print(f"no NVIDIA GPU ({exc}): rehearsing", file=sys.stderr)
            real = False
    if not real:
        gpus = {"backend": "sim", "sim": [{"name": "Simulated H200", "memory_mib": 4096}]}
        backend, _ = open_backend(GpuSettings.model_validate(gpus))
    args.logs.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        setup = Setup(backend, args.server.resolve(), gpus, Path(work), args.logs, real, began + args.budget_s)
        report = header(setup)
        spent = 0.0
        for title, step, share in STEPS:
            spent += share
            step_setup = dataclasses.replace(setup, deadline=began + args.budget_s * spent)
            started = time.monotonic()
            try:
                body = step(step_setup)
            except Exception as exc:  # one step's failure is reported and the others still run
                (args.logs / "errors.txt").open("a").write(traceback.format_exc())
                body = [f"**failed**: {type(exc).__name__}: {str(exc)[:400]}"]
            report += ["", f"## {title} ({time.monotonic() - started:.0f} s)", "", *body]
            print(f"{title}: {time.monotonic() - started:.0f} s", flush=True)
            # After every step: a call stopped at its limit still brings back what was measured.
            args.report.write_text("\n".join(report) + "\n")
        backend.close()
    print(f"report: {args.report} ({time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
