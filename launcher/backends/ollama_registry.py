"""The size of an Ollama model not yet in the store, from its manifest at the registry (`GET
/v2/{namespace}/{model}/manifests/{tag}`: a few hundred bytes of JSON listing its layers and their sizes),
so it is planned before Ollama pulls a byte of it."""

from __future__ import annotations

import httpx

from launcher.errors import ConfigError

_MODEL_LAYER = "application/vnd.ollama.image.model"
_PROJECTOR_LAYER = "application/vnd.ollama.image.projector"
_MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
_TIMEOUT_S = 10.0
_MANIFEST_BYTES = 1024 * 1024


def manifest_url(name: str, registry: str) -> str:
    """Where the manifest of ``name`` (`[namespace/]model[:tag]`) is at ``registry``."""
    base, _, tag = name.partition(":")
    namespace, _, model = base.rpartition("/")
    return f"{registry.rstrip('/')}/v2/{namespace or 'library'}/{model}/manifests/{tag or 'latest'}"


def registry_model_bytes(name: str, registry: str, timeout_s: float = _TIMEOUT_S) -> int:
    """The bytes of ``name``'s weights (its model and projector layers) per its manifest at ``registry``;
    ConfigError in one sentence when the registry does not have it, cannot be reached or answers nonsense."""
    url = manifest_url(name, registry)
    try:
        answer = httpx.get(url, headers={"Accept": _MANIFEST_TYPE}, timeout=timeout_s, follow_redirects=True)
    except httpx.HTTPError as exc:
        raise ConfigError(
            f"the Ollama registry at {registry} cannot be reached to plan {name} before its pull: "
            f"{exc or type(exc).__name__}",
            hint="check the network, or pull it with `ollama pull` (or set ollama.size_mib)",
        ) from None
    if answer.status_code == 404:
        raise ConfigError(f"the Ollama registry at {registry} has no model {name}", hint="check models.*.model")
    if answer.status_code != 200:
        raise ConfigError(f"the Ollama registry at {registry} answered HTTP {answer.status_code} for {name}'s manifest")
    try:
        layers = answer.json().get("layers") if len(answer.content) <= _MANIFEST_BYTES else None
    except (ValueError, AttributeError):
        layers = None
    sizes = [
        layer["size"]
        for layer in (layers if isinstance(layers, list) else [])
        if isinstance(layer, dict)
        and layer.get("mediaType") in (_MODEL_LAYER, _PROJECTOR_LAYER)
        and isinstance(layer.get("size"), int)
        and layer["size"] > 0
    ]
    if not sizes:
        raise ConfigError(f"the manifest of {name} at {registry} lists no model layer with its size")
    return sum(sizes)
