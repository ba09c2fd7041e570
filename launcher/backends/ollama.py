"""Ollama: `ollama serve` on its own port, told by its environment which GPUs it sees and whether to
spread the model over them; ready once the configured model is loaded (`/api/ps` lists it).

The model's size for planning comes from its GGUF blob in the Ollama store (manifest -> blob), read
like any other GGUF file, or from `ollama.size_mib`, or, for a model in neither, from its manifest at the
registry (ollama_registry.py): the start pulls it first (supervise/ollama_downloads.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import httpx

from launcher.backends.base import Health, LaunchSpec, child_environment, configured_binary
from launcher.backends.ollama_registry import registry_model_bytes
from launcher.config_model import ModelSettings
from launcher.errors import ConfigError
from launcher.plan.estimate import ModelShape, size_only
from launcher.plan.gguf import ModelFileError, open_regular
from launcher.plan.placement import Placement
from launcher.schema_plans import Plan, PlanCheck

_MODEL_LAYER = "application/vnd.ollama.image.model"
_REGISTRY = "registry.ollama.ai"
_MIB = 1024 * 1024
_MANIFEST_BYTES = _MIB


def models_dir(model: ModelSettings) -> Path:
    """Where this Ollama keeps its models: `ollama.models_dir`, else $OLLAMA_MODELS, else ~/.ollama/models."""
    configured = model.ollama.models_dir or model.env.get("OLLAMA_MODELS") or os.environ.get("OLLAMA_MODELS")
    return Path(configured) if configured else Path.home() / ".ollama" / "models"


def blob_for(name: str, store: Path) -> Path | None:
    """The GGUF blob of model ``name`` (`[namespace/]model[:tag]`) in the store, via its manifest."""
    base, _, tag = name.partition(":")
    namespace, _, model = base.rpartition("/")
    manifest = store / "manifests" / _REGISTRY / (namespace or "library") / model / (tag or "latest")
    try:  # a manifest is a few hundred bytes of JSON: only a regular file, and only its first MiB, is read
        with os.fdopen(open_regular(manifest, "Ollama manifest"), "rb") as f:
            layers = json.loads(f.read(_MANIFEST_BYTES)).get("layers", [])
    except (OSError, ValueError, AttributeError, ModelFileError):
        return None
    if not isinstance(layers, list):
        return None
    for layer in layers:
        if isinstance(layer, dict) and layer.get("mediaType") == _MODEL_LAYER and isinstance(layer.get("digest"), str):
            blob = store / "blobs" / layer["digest"].replace(":", "-")
            return blob if blob.is_file() else None
    return None


class OllamaBackend:
    name = "ollama"

    def __init__(self, model: ModelSettings) -> None:
        self._name = str(model.model)
        self._keep_alive = model.ollama.keep_alive
        parallel = model.ollama.num_parallel or model.env.get("OLLAMA_NUM_PARALLEL")
        self._slots = int(parallel) if parallel and str(parallel).isdigit() and int(parallel) > 0 else 1
        self._loading: dict[int, asyncio.Task[None]] = {}  # port -> the load request under way

    def binary(self, model: ModelSettings) -> Path:
        if model.binary is not None:
            return configured_binary(model.binary, "ollama")
        found = shutil.which("ollama")
        if found is None:
            raise ConfigError("no ollama binary on PATH", hint="install Ollama, or set `binary:` for the model")
        return Path(found)

    def check_model(self, model: ModelSettings, name: str) -> None:
        """Nothing to check: a model not in the store is pulled at its start (supervise/ollama_downloads.py)."""

    def remote_shape(self, model: ModelSettings) -> ModelShape | None:
        """A model not in the store and without `ollama.size_mib`: sized by its manifest at the registry."""
        if model.ollama.size_mib is not None or self.model_file(model) is not None:
            return None
        return size_only(registry_model_bytes(str(model.model), model.ollama.registry))

    def model_file(self, model: ModelSettings) -> Path | None:
        return blob_for(str(model.model), models_dir(model))

    def launch_spec(self, model: ModelSettings, port: int, placement: Placement) -> LaunchSpec:
        o = model.ollama
        env = {
            "OLLAMA_HOST": f"127.0.0.1:{port}",
            # Set both ways: whether spreading is on by default depends on Ollama's version.
            "OLLAMA_SCHED_SPREAD": "1" if len(placement.gpus) > 1 else "0",
            "OLLAMA_KEEP_ALIVE": o.keep_alive,
        }
        optional = {
            "OLLAMA_NUM_PARALLEL": o.num_parallel,
            "OLLAMA_MAX_LOADED_MODELS": o.max_loaded_models,
            "OLLAMA_FLASH_ATTENTION": None if o.flash_attention is None else int(o.flash_attention),
            "OLLAMA_KV_CACHE_TYPE": o.kv_cache_type,
            "OLLAMA_CONTEXT_LENGTH": model.ctx,
            "OLLAMA_GPU_OVERHEAD": None if o.gpu_overhead_mib is None else o.gpu_overhead_mib * _MIB,
            "OLLAMA_MODELS": o.models_dir,
        }
        env |= {key: str(value) for key, value in optional.items() if value is not None}
        argv = [str(self.binary(model)), "serve", *model.args]
        return LaunchSpec(argv=argv, env=child_environment(placement, env, model.env))

    async def _get(self, client: httpx.AsyncClient, port: int, path: str, timeout_s: float) -> Any:
        try:
            response = await client.get(f"http://127.0.0.1:{port}{path}", timeout=timeout_s)
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        with contextlib.suppress(ValueError):
            return response.json()
        return None

    async def _loaded(self, client: httpx.AsyncClient, port: int, timeout_s: float) -> dict[str, Any] | None:
        ps = await self._get(client, port, "/api/ps", timeout_s)
        for entry in (ps or {}).get("models", []):
            if self._name in (entry.get("name"), entry.get("model")):
                return dict(entry)
        return None

    def _load(self, client: httpx.AsyncClient, port: int) -> None:
        """Ask Ollama to load the model and keep it (a generate request without a prompt), once at a time."""
        if port in self._loading and not self._loading[port].done():
            return

        async def load() -> None:
            with contextlib.suppress(httpx.HTTPError):
                body = {"model": self._name, "keep_alive": self._keep_alive}
                await client.post(f"http://127.0.0.1:{port}/api/generate", json=body, timeout=None)

        self._loading[port] = asyncio.create_task(load())

    async def is_ready(self, client: httpx.AsyncClient, port: int, timeout_s: float) -> bool:
        if await self._loaded(client, port, timeout_s) is not None:
            return True
        if await self._get(client, port, "/api/version", timeout_s) is not None:
            self._load(client, port)  # the server answers: have it load the model
        return False

    async def health(self, client: httpx.AsyncClient, port: int, timeout_s: float) -> Health:
        if await self._get(client, port, "/api/version", timeout_s) is None:
            return Health(ok=False)
        entry = await self._loaded(client, port, timeout_s)
        if entry is None:  # unloaded by Ollama itself (keep_alive, memory pressure): load it again
            self._load(client, port)
            return Health(ok=True, reloading=True)
        size, vram = int(entry.get("size", 0)), int(entry.get("size_vram", 0))
        warning = None
        if vram < size:
            warning = (
                f"only {vram // _MIB} of {size // _MIB} MiB of {self._name} are on the GPUs: "
                "the rest runs on the CPU, much slower"
            )
        return Health(ok=True, details={"size_bytes": size, "size_vram_bytes": vram}, warning=warning)

    async def slots(self, client: httpx.AsyncClient, port: int, timeout_s: float) -> int:
        return self._slots  # OLLAMA_NUM_PARALLEL, 1 when unset as in current Ollama

    def upstream_model(self) -> str | None:
        return self._name  # the front door's name for it is the launcher's; Ollama's is `model:`

    def check_plan(self, plan: Plan, log_lines: list[str]) -> PlanCheck | str:
        return "Ollama reports its sizes through /api/ps (server_info), not per device and term"
