"""Server backends: how to launch a kind of server and how to tell that it is ready.

One narrow seam (`ServerBackend`) with one implementation per server; the supervisor knows nothing else
about the server it runs.
"""

from __future__ import annotations

from launcher.backends.base import LaunchSpec, Placement, ServerBackend
from launcher.backends.llama_server import LlamaServerBackend
from launcher.config import ModelSettings
from launcher.errors import ConfigError

__all__ = ["LaunchSpec", "Placement", "ServerBackend", "backend_for"]


def backend_for(model: ModelSettings) -> ServerBackend:
    if model.backend == "llama-server":
        return LlamaServerBackend()
    raise ConfigError(f"the {model.backend} backend is not available yet", hint="use backend: llama-server")
