"""Server backends: how to launch a kind of server and how to tell that it is ready.

One narrow seam (`ServerBackend`) with one implementation per server; the supervisor knows nothing else
about the server it runs.
"""

from __future__ import annotations

from launcher.backends.base import Health, LaunchSpec, ServerBackend
from launcher.backends.llama_server import LlamaServerBackend
from launcher.backends.ollama import OllamaBackend
from launcher.backends.rpc_server import RpcServerBackend
from launcher.config import ModelSettings, RpcSettings

__all__ = ["Health", "LaunchSpec", "ServerBackend", "backend_for", "model_backend"]


def backend_for(model: ModelSettings, rpc: RpcSettings) -> ServerBackend:
    """The backend of any entry: an rpc-server binds ``rpc.listen``."""
    if model.backend == "rpc-server":
        return RpcServerBackend(rpc.listen)
    return model_backend(model)


def model_backend(model: ModelSettings) -> ServerBackend:
    """The backend of an entry that serves a model (llama-server, Ollama): what the planner reads."""
    if model.backend == "ollama":
        return OllamaBackend(model)
    return LlamaServerBackend(model)
