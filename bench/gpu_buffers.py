"""The planner against CUDA (issue 27): the launcher's own plan of a generated model (zeros, a sparse file)
and the command it would launch, run for real; llama-server's `-lv 4` buffers and the memory NVML shows
the process holding once it is ready, set beside the plan's terms. And VRAM coming back after kill -9.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import statistics
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench import gpu_smi
from launcher.backends import llama_log
from launcher.config_file import load_settings
from launcher.gpu.base import GpuBackend
from launcher.local import plan_here
from launcher.schema_plans import Plan, TermCheck
from launcher.tinymodel import TinyShape, write_tiny_llama

_FLASH = re.compile(r"Flash Attention (enabled|not supported)")


@dataclass(frozen=True)
class Setup:
    """What every step runs against: the GPU backend (NVML, or simulated GPUs in a rehearsal), the
    llama-server binary, the `gpus:` configuration, a folder for files and one for raw logs."""

    backend: GpuBackend
    server: Path
    gpus: dict[str, Any]
    work: Path
    logs: Path
    real: bool
    deadline: float  # time.monotonic() after which steps stop adding cases

    def model(self, name: str, shape: TinyShape) -> Path:
        path = self.work / f"{name}.gguf"
        return path if path.exists() else write_tiny_llama(path, shape, header_only=True)

    def config(self, models: dict[str, dict[str, Any]], daemon: dict[str, Any] | None = None) -> Path:
        entries = {name: {"binary": str(self.server), "port": "auto", **m} for name, m in models.items()}
        document = {
            "gpus": self.gpus,
            "daemon": {"state_dir": str(self.work / "state"), **(daemon or {})},
            "models": entries,
        }
        path = self.work / "launcher.yaml"
        path.write_text(yaml.safe_dump(document))
        return path

    def plan(self, model: Path, ctx: int, args: list[str]) -> Plan:
        settings = load_settings(self.config({"m": {"model": str(model), "ctx": ctx, "args": args}}))
        return plan_here(settings, "m")


@contextlib.contextmanager
def running(plan: Plan, log: Path, timeout_s: float = 180) -> Iterator[subprocess.Popen[bytes]]:
    """The plan's server, ready (or RuntimeError with its log's end); stopped afterwards."""
    port = int(plan.command[plan.command.index("--port") + 1])
    with log.open("wb") as out:
        proc = subprocess.Popen(plan.command, env={**os.environ, **plan.env}, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        with httpx.Client() as client:
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"llama-server not ready: {log.read_text(errors='replace')[-800:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        break
                time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def process_mib(setup: Setup, pid: int) -> tuple[int | None, int | None]:
    """(NVML's, nvidia-smi's) MiB held by ``pid`` on GPU 0; None where not shown (a rehearsal's CPU)."""
    processes = setup.backend.read(0, processes=True).processes or ()
    nvml = next((p.used_mib for p in processes if p.pid == pid), None)
    smi = None
    if setup.real:
        # nvidia-smi's side is a comparison only: a tool that fails leaves it empty, the case still counts.
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            smi = gpu_smi.parse_apps(gpu_smi.query(0, ["--query-compute-apps=pid,used_memory"])).get(pid)
    return nvml, smi


# One case: a shape, a context, the KV cache type and -fa.
Case = tuple[str, int, str, str]


def cases(shapes: dict[str, TinyShape], contexts: tuple[int, ...]) -> list[Case]:
    """Context by context (``contexts`` in order of interest: the cases the time leaves out are the last),
    every shape with -fa off, on and auto; then a q8_0 cache at the longest context."""
    result = [(name, ctx, "f16", fa) for ctx in contexts for name in shapes for fa in ("off", "on", "auto")]
    # a quantised V cache needs flash attention
    return result + [(name, max(contexts), "q8_0", "on") for name in shapes]


def _pair(terms: Mapping[str, TermCheck], term: str) -> str:
    return f"{terms[term].planned_mib:.0f} / {terms[term].actual_mib:.0f}" if term in terms else "-"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def planner_vs_cuda(setup: Setup, shapes: dict[str, TinyShape], contexts: tuple[int, ...]) -> list[str]:
    """The table of every case that fits in the time left, and what it says of the driver's share."""
    lines = [
        "MiB; plan / llama-server's buffers on the GPU (CUDA0); `process` is NVML's per-process memory once "
        "ready (nvidia-smi's in brackets); `driver+ctx` = process - the server's GPU buffers.",
        "",
        "| model | ctx | KV | -fa (plan / server's auto) | weights | KV | compute | planned total (overhead) "
        "| process | driver+ctx | not planned |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    shares: list[float] = []
    skipped = 0
    for n, (name, ctx, cache, fa) in enumerate(cases(shapes, contexts)):
        if time.monotonic() > setup.deadline:
            skipped += 1
            continue
        model = setup.model(name, shapes[name])
        plan = setup.plan(model, ctx, ["-ctk", cache, "-ctv", cache, "-fa", fa, "-lv", "4"])
        if not plan.fits:
            lines.append(f"| {name} | {ctx} | {cache} | {fa} | plan: {plan.reason} |||||||")
            continue
        log = setup.logs / f"case{n}.log"
        try:
            with running(plan, log) as proc:
                nvml_mib, smi_mib = process_mib(setup, proc.pid)
        except RuntimeError as exc:
            lines.append(f"| {name} | {ctx} | {cache} | {fa} | {str(exc)[:200]!r} |||||||")
            continue
        text = log.read_text(errors="replace")
        check = llama_log.check(plan, llama_log.parse(text))
        decided = _FLASH.search(text)
        server_fa = decided[1] if decided else "-"  # the server says what it decided for `auto` only
        gpu = check.devices[0] if plan.devices else None
        terms = gpu.terms if gpu is not None else {}
        planned = plan.devices[0] if plan.devices else None

        actual_gpu = gpu.actual_mib if gpu is not None else None
        share = nvml_mib - actual_gpu if nvml_mib is not None and actual_gpu is not None else None
        if share is not None:
            shares.append(share)
        total = f"{planned.total_mib} ({planned.overhead_mib})" if planned is not None else "-"
        process = f"{_mib(nvml_mib)} [{_mib(smi_mib)}]"
        lines.append(
            f"| {name} | {ctx} | {cache} | {fa} ({'on' if plan.flash_attn else 'off'} / {server_fa}) "
            f"| {_pair(terms, 'weights')} | {_pair(terms, 'kv')} "
            f"| {_pair(terms, 'compute')} | {total} | {process} | {_mib(share)} | {', '.join(check.unmatched) or '-'} |"
        )
    if skipped:
        lines.append(f"\n{skipped} cases left out: the step's time was spent.")
    if shares:
        lines.append(
            f"\ndriver + context per process (MiB): median {statistics.median(shares):.0f}, min {min(shares):.0f}, "
            f"max {max(shares):.0f} over {len(shares)} cases (the planner's `gpus.overhead_mib` guess: 512)."
        )
    return lines


def _used_mib(setup: Setup) -> int:
    return setup.backend.read(0, processes=False).memory_used_mib or 0


def vram_back(setup: Setup, shape: TinyShape, ctx: int, rounds: int = 10) -> list[str]:
    """kill -9 a ready server, then time until NVML shows its memory free again (and until it is reaped)."""
    model = setup.model("vram", shape)
    plan = setup.plan(model, ctx, [])
    if not plan.fits:
        return [f"plan: {plan.reason}"]
    freed_s: list[float] = []
    reaped_s: list[float] = []
    held: list[int] = []
    for _ in range(rounds):
        if time.monotonic() > setup.deadline:
            break
        before = _used_mib(setup)
        with running(plan, setup.logs / "vram.log") as proc:
            loaded = _used_mib(setup)
            held.append(loaded - before)
            began = time.monotonic()
            proc.send_signal(signal.SIGKILL)
            # Free again: back to within 2 % (or 64 MiB) of what was used before it started.
            slack = max(64, (loaded - before) // 50)
            reaped = None
            while time.monotonic() - began < 60:
                if reaped is None and proc.poll() is not None:
                    reaped = time.monotonic() - began
                if _used_mib(setup) <= before + slack:
                    break
                time.sleep(0.005)
            freed_s.append(time.monotonic() - began)
            proc.wait()
            reaped_s.append(reaped if reaped is not None else time.monotonic() - began)
    if not freed_s:
        return ["no round ran: the step's time was spent"]
    return [
        f"{len(freed_s)} rounds of kill -9 on a ready server holding a median {statistics.median(held)} MiB "
        f"(plan: {plan.devices[0].total_mib if plan.devices else 0} MiB):",
        "",
        "| | median s | min s | max s |",
        "|---|---|---|---|",
        f"| process reaped | {statistics.median(reaped_s):.3f} | {min(reaped_s):.3f} | {max(reaped_s):.3f} |",
        f"| NVML shows it free | {statistics.median(freed_s):.3f} | {min(freed_s):.3f} | {max(freed_s):.3f} |",
    ]
