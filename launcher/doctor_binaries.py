"""`launcher doctor`'s checks of the programs the models run: llama-server (found, and built with GPU
support), ollama and rpc-server."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from launcher.backends.llama_server import find_llama_server
from launcher.backends.rpc_server import find_rpc_server
from launcher.config import Settings
from launcher.config_model import ModelSettings
from launcher.doctor_findings import Finding, Level, Machine
from launcher.errors import LauncherError

_DEVICE_LINE = re.compile(r"^\s*(CUDA|ROCm|HIP|Vulkan|Metal|SYCL|MUSA|CANN)\d+:", re.MULTILINE)


def binary_findings(settings: Settings, machine: Machine) -> Iterator[Finding]:
    llama_models = {n: m for n, m in settings.models.items() if m.backend == "llama-server"}
    binaries: dict[Path, list[str]] = {}
    candidates: dict[str, ModelSettings | None] = dict(llama_models) or {"(default)": None}
    for name, model in candidates.items():
        try:
            binary = find_llama_server(model.binary if model is not None else None)
        except LauncherError as exc:
            yield Finding("fail" if llama_models else "warn", "llama-server", exc.message, exc.hint)
            continue
        binaries.setdefault(binary, []).append(name)
    for binary, users in binaries.items():
        yield from _llama_server_devices(binary, users, machine)
    ollama_models = [n for n, m in settings.models.items() if m.backend == "ollama"]
    ollama = shutil.which("ollama")
    if ollama is None:
        level: Level = "fail" if ollama_models else "warn"
        needed = f" (needed by {', '.join(ollama_models)})" if ollama_models else ""
        yield Finding(level, "ollama", f"no ollama binary on PATH{needed}", "install Ollama, or set `binary:`")
    else:
        yield Finding("ok", "ollama", f"ollama at {ollama}")
    for name, model in settings.models.items():
        if model.backend == "rpc-server":
            try:
                yield Finding("ok", "rpc-server", f"{name}: {find_rpc_server(model.binary)}")
            except LauncherError as exc:
                yield Finding("fail", "rpc-server", f"{name}: {exc.message}", exc.hint)


def _llama_server_devices(binary: Path, users: list[str], machine: Machine) -> Iterator[Finding]:
    try:
        listed = subprocess.run(
            [str(binary), "--list-devices"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        yield Finding("fail", "llama-server", f"{binary} does not run: {exc}", "rebuild it or set `binary:`")
        return
    devices = _DEVICE_LINE.findall(listed.stdout + listed.stderr)
    used_by = ", ".join(users)
    if devices:
        yield Finding("ok", "llama-server", f"{binary} ({used_by}) sees {len(devices)} GPU device(s)")
    elif machine.gpus and not machine.simulated:
        yield Finding(
            "fail",
            "llama-server",
            f"{binary} ({used_by}) was built without GPU support: it lists no GPU device",
            "build llama.cpp with -DGGML_CUDA=ON (NVIDIA) or -DGGML_HIP=ON (AMD) and set `binary:`",
        )
    else:
        yield Finding("ok", "llama-server", f"{binary} ({used_by}) is a CPU build; no real GPU here to use")
