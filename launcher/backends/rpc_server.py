"""llama.cpp's ggml-rpc-server: lends the GPUs it sees to a llama-server elsewhere (`--rpc HOST:PORT`).

It binds `rpc.listen` (loopback or private: it has no authentication), sees the entry's GPUs through
the usual visibility environment, and is ready once it answers RPC's HELLO. It serves one client at a
time, so while a llama-server is attached its health is read from the socket table instead.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx

from launcher.backends.base import Health, LaunchSpec, child_environment, configured_binary
from launcher.backends.llama_server import find_llama_server
from launcher.config_model import ModelSettings
from launcher.errors import ConfigError, LauncherError
from launcher.plan.placement import Placement
from launcher.rpc.sockets import sockets_on
from launcher.rpc.wire import Hello, say_hello
from launcher.schema_plans import Plan, PlanCheck

# The name CMake gives it since the tools were renamed; llama.cpp's own build used to call it rpc-server.
BINARY_NAMES = ("ggml-rpc-server", "rpc-server")


def find_rpc_server(configured: Path | None) -> Path:
    """The configured binary, else the one beside llama-server (same build, same RPC protocol), else one
    on PATH."""
    if configured is not None:
        return configured_binary(configured, "rpc-server")
    try:
        beside = [find_llama_server(None).parent / name for name in BINARY_NAMES]
    except LauncherError:
        beside = []
    on_path = [Path(found) for found in map(shutil.which, BINARY_NAMES) if found is not None]
    for path in [*beside, *on_path]:
        if path.is_file():
            return path
    raise ConfigError(
        "no ggml-rpc-server binary found (not configured, not beside llama-server, not on PATH)",
        hint="build llama.cpp with -DGGML_RPC=ON, or set `binary:` for the rpc-server entry",
    )


class RpcServerBackend:
    name = "rpc-server"

    def __init__(self, listen: str) -> None:
        self.listen = listen
        self.hellos: dict[int, Hello] = {}  # port -> what the server last said to a probe

    def binary(self, model: ModelSettings) -> Path:
        return find_rpc_server(model.binary)

    def check_model(self, model: ModelSettings, name: str) -> None:
        """Nothing to check: the llama-server that attaches brings the model."""

    def model_file(self, model: ModelSettings) -> Path | None:
        return None

    def launch_spec(self, model: ModelSettings, port: int, placement: Placement) -> LaunchSpec:
        argv = [str(self.binary(model)), "--host", self.listen, "--port", str(port), *model.args]
        return LaunchSpec(argv=argv, env=child_environment(placement, model.env))

    async def is_ready(self, client: httpx.AsyncClient, port: int, timeout_s: float) -> bool:
        hello = await say_hello(self.listen, port, timeout_s)
        if hello is not None:
            self.hellos[port] = hello
        return hello is not None

    async def health(self, client: httpx.AsyncClient, port: int, timeout_s: float) -> Health:
        seen = sockets_on(port)
        if seen.listening and seen.clients:  # serving a client: a HELLO would wait behind it
            return Health(ok=True)
        return Health(ok=await self.is_ready(client, port, timeout_s))

    async def slots(self, client: httpx.AsyncClient, port: int, timeout_s: float) -> int:
        return 1  # one client at a time: a second llama-server waits until the first lets go

    def upstream_model(self) -> str | None:
        return None  # never routed to: it serves devices, not a model

    def check_plan(self, plan: Plan, log_lines: list[str]) -> PlanCheck | str:
        return "an rpc-server has no plan of a model: the llama-server using it reports its buffers"
