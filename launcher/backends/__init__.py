"""Server backends: how to launch a kind of server from a model and its placement (the command line and
the child's environment, the GPUs it sees included), where its model file is for the planner, and how to
tell that it is ready.

One narrow seam (`ServerBackend`) with one implementation per server; the supervisor knows nothing else
about the server it runs.
"""

from __future__ import annotations

from launcher.backends.base import Health, LaunchSpec, ServerBackend, planned_file, planned_model, with_command
from launcher.backends.llama_server import LlamaServerBackend
from launcher.backends.ollama import OllamaBackend
from launcher.backends.rpc_server import RpcServerBackend
from launcher.config_model import ModelSettings
from launcher.config_rpc import RpcSettings

__all__ = [
    "Health",
    "LaunchSpec",
    "ServerBackend",
    "backend_for",
    "planned_file",
    "planned_model",
    "with_command",
]


def backend_for(model: ModelSettings, rpc: RpcSettings) -> ServerBackend:
    """The backend of any entry: an rpc-server binds ``rpc.listen``."""
    if model.backend == "rpc-server":
        return RpcServerBackend(rpc.listen)
    if model.backend == "ollama":
        return OllamaBackend(model)
    return LlamaServerBackend(model)
