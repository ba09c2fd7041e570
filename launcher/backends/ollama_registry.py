"""The size of an Ollama model not yet in the store, from its manifest at the registry (`GET
/v2/{namespace}/{model}/manifests/{tag}`: a few hundred bytes of JSON listing its layers and their sizes),
so it is planned before Ollama pulls a byte of it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json

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
    try:
        status, body = _manifest(manifest_url(name, registry), timeout_s)
    except _Unbounded as exc:
        raise ConfigError(
            f"the Ollama registry at {registry} {exc} for {name}'s manifest (a few hundred bytes)"
        ) from None
    except httpx.HTTPError as exc:
        raise ConfigError(
            f"the Ollama registry at {registry} cannot be reached to plan {name} before its pull: "
            f"{exc or type(exc).__name__}",
            hint="check the network, or pull it with `ollama pull` (or set ollama.size_mib)",
        ) from None
    if status == 404:
        raise ConfigError(f"the Ollama registry at {registry} has no model {name}", hint="check models.*.model")
    if status != 200:
        raise ConfigError(f"the Ollama registry at {registry} answered HTTP {status} for {name}'s manifest")
    try:
        layers = json.loads(body).get("layers")
    except (ValueError, AttributeError, RecursionError):
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


class _Unbounded(Exception):
    """An answer past the bounds of a manifest, in words that follow "the registry at X"."""


def _manifest(url: str, timeout_s: float) -> tuple[int, bytes]:
    """The answer's status and body, read as it comes and given up past ``_MANIFEST_BYTES`` or ``timeout_s``
    in all, headers included: a registry that sends without end, or a byte at a time, costs no more. In a
    loop of its own (a thread: callers may run in one), where a deadline cancels whatever read waits; a
    blocking client's timeout bounds each read, not the whole. Asked uncompressed and read raw, so that no
    small chunk inflates to a large one."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ollama-manifest") as pool:
        return pool.submit(asyncio.run, _read_manifest(url, timeout_s)).result()


async def _read_manifest(url: str, timeout_s: float) -> tuple[int, bytes]:
    headers = {"Accept": _MANIFEST_TYPE, "Accept-Encoding": "identity"}
    try:
        async with (
            asyncio.timeout(timeout_s),
            httpx.AsyncClient(timeout=timeout_s, follow_redirects=True) as client,
            client.stream("GET", url, headers=headers) as answer,
        ):
            if answer.status_code != 200:
                return answer.status_code, b""
            body = bytearray()
            async for chunk in answer.aiter_raw():
                body += chunk
                if len(body) > _MANIFEST_BYTES:
                    raise _Unbounded(f"answered more than {_MANIFEST_BYTES // 1024} KiB")
            return answer.status_code, bytes(body)
    except TimeoutError:  # the deadline in all (a read's own timeout is httpx's, an HTTPError)
        raise _Unbounded(f"took more than {timeout_s:g} s to answer") from None
