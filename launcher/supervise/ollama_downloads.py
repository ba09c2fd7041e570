"""The pull of an Ollama model that is not in Ollama's store, before its start: Ollama pulls only through
its own server, so an `ollama serve` of the model's settings (its store, its environment, no GPUs) runs for
the pull alone; its POST /api/pull stream of JSON lines shows as the instance's `downloading` progress (the
same state, events and front-door 503 as a hub model's download); the server is stopped at the end, and
the start that follows plans from the blob now in the store. Planned before the pull from the size in the
registry's manifest (backends/ollama_registry.py): a model that does not fit is refused first. A stop
cancels the pull (Ollama keeps what it fetched for the next pull); an error line in the stream leaves the
instance failed with Ollama's words.

Which models: those not in the store the launcher reads and without `ollama.size_mib` (a model with a
size is left to Ollama as before)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import TypeGuard

import httpx

from launcher.backends.base import LaunchSpec
from launcher.backends.ollama import OllamaBackend, blob_for, models_dir
from launcher.errors import ConflictError, StartError
from launcher.hub.download import PullProgress
from launcher.hub.fetching import RateMeter
from launcher.plan.placement import Placement
from launcher.schema_plans import Plan
from launcher.supervise.downloads import planned_to_fit
from launcher.supervise.instance import Instance
from launcher.supervise.process import ServerProcess

_SERVER_UP_S = 30.0  # for `ollama serve` to answer before the pull
_STOP_S = 10.0
_PROBE_S = 0.1
_LAYER_MAX_BYTES = 2**50
_DIGEST_MAX_CHARS = 128  # "sha256:" and 64 hex digits
PULL_LINE_MAX_BYTES = 64 * 1024  # a line of Ollama's pull stream: a few hundred bytes, an error a few more
PULL_MAX_LAYERS = 64  # layers whose progress is kept: a model has a handful (weights, projector, template...)


def needs_pull(instance: Instance) -> bool:
    """An Ollama model that is not in the store the launcher reads and has no `ollama.size_mib`."""
    settings = instance.settings
    return (
        isinstance(instance.backend, OllamaBackend)
        and settings.ollama.size_mib is None
        and blob_for(str(settings.model), models_dir(settings)) is None
    )


def _is_size(value: object) -> TypeGuard[int]:
    """A byte count a layer may have: an integer from 0 to a pebibyte (the largest models are a few TB)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _LAYER_MAX_BYTES


class PullStream:
    """Ollama's pull progress lines (`{"status", "digest", "total", "completed"}` per layer, or `{"error"}`)
    summed over the layers seen so far (at most `PULL_MAX_LAYERS` of them)."""

    def __init__(self, model: str) -> None:
        self._model = model
        self._layers: dict[str, tuple[int, int]] = {}  # digest -> (completed, total)

    def line(self, text: str) -> PullProgress | None:
        """The progress after ``text``, None for a line without a layer; StartError for an error line."""
        try:
            said = json.loads(text)
        except ValueError:
            raise StartError(f"Ollama's pull of {self._model} answered something not JSON: {text[:200]!r}") from None
        if not isinstance(said, dict):
            return None
        if said.get("error"):
            raise StartError(f"Ollama could not pull {self._model}: {str(said['error'])[:300]}")
        digest, total, completed = said.get("digest"), said.get("total"), said.get("completed", 0)
        if not isinstance(digest, str) or not _is_size(total) or not _is_size(completed):
            return None  # no progress to show: never a negative or absurd one
        if len(digest) > _DIGEST_MAX_CHARS or (digest not in self._layers and len(self._layers) >= PULL_MAX_LAYERS):
            return None  # kept bounded whatever the stream says: a layer past them is not shown
        self._layers[digest] = (min(completed, total), total)
        return PullProgress(
            done_bytes=sum(done for done, _ in self._layers.values()),
            total_bytes=sum(size for _, size in self._layers.values()),
            file=f"{self._model} ({digest[:19]})",
        )


async def begin_ollama_pull(
    instance: Instance, port: int, plan: Callable[[], Awaitable[Plan]], then_start: Callable[[], None]
) -> bool:
    """When ``instance``'s Ollama model must be pulled (`needs_pull`): its ``plan`` (from the registry's
    manifest) must fit, then it is pulled in the background through an `ollama serve` on ``port``,
    ``then_start`` at the end; True then. False: nothing to pull."""
    if instance.downloading:
        raise ConflictError(f"{instance.name} is already downloading")
    instance.refuse_if_retired()  # the daemon stops, or a reload removed it: no `ollama serve` for a pull
    if instance.active or not await asyncio.to_thread(needs_pull, instance):
        return False
    await planned_to_fit(instance, plan)
    instance.refuse_if_retired()  # meanwhile: its stop found no pull to end, and none would end this one
    if instance.downloading or instance.active:  # started meanwhile (by the front door while this planned)
        raise ConflictError(f"{instance.name} is already {instance.state}")
    spec = instance.backend.launch_spec(instance.settings, port, Placement())  # the pull uses no GPU
    task = asyncio.create_task(_pull(instance, spec, port), name=f"ollama-pull:{instance.name}")
    task.add_done_callback(lambda done: None if done.cancelled() or done.exception() else then_start())
    instance.begin_download(task, f"pulling {instance.settings.model} through Ollama on port {port}")
    return True


async def _pull(instance: Instance, spec: LaunchSpec, port: int) -> None:
    model = str(instance.settings.model)
    server = await ServerProcess.spawn(spec, instance.log_path)
    meter = RateMeter()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            await _await_server(client, server, model)
            stream = PullStream(model)

            def take(text: str) -> None:
                progress = stream.line(text)
                if progress is not None:
                    instance.download_progress(meter.reading(progress))

            await _pull_lines(client, model, take)
    finally:
        await server.stop(_STOP_S)
    if not await asyncio.to_thread(blob_for, model, models_dir(instance.settings)):
        raise StartError(
            f"Ollama pulled {model} but it is not in the store the launcher reads ({models_dir(instance.settings)})",
            hint="set ollama.models_dir (or OLLAMA_MODELS) to the store this Ollama uses",
        )


async def _await_server(client: httpx.AsyncClient, server: ServerProcess, model: str) -> None:
    deadline = time.monotonic() + _SERVER_UP_S
    while time.monotonic() < deadline:
        if not server.running:
            raise StartError(f"ollama serve ended before it could pull {model} (its log says why)")
        try:
            if (await client.get("/api/version", timeout=1.0)).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.wait([server.exited], timeout=_PROBE_S)
    raise StartError(f"ollama serve did not answer within {_SERVER_UP_S:g}s, so {model} could not be pulled")


async def _pull_lines(client: httpx.AsyncClient, model: str, take: Callable[[str], None]) -> None:
    """Each line of Ollama's pull stream to ``take``; an answer that is not a stream is one error line.
    The name goes as `model` and as `name`, which Ollama before `model` took. No line, nor an error's body,
    is held past `PULL_LINE_MAX_BYTES`."""
    request = {"model": model, "name": model, "stream": True}
    try:
        async with client.stream("POST", "/api/pull", json=request, timeout=None) as answer:
            if answer.status_code != 200:
                body = (await _bounded_body(answer)).decode(errors="replace")
                take(body if body.strip().startswith("{") else json.dumps({"error": f"HTTP {answer.status_code}"}))
                return
            rest = b""
            async for chunk in answer.aiter_bytes():
                *lines, rest = (rest + chunk).split(b"\n")
                if len(rest) > PULL_LINE_MAX_BYTES or any(len(line) > PULL_LINE_MAX_BYTES for line in lines):
                    raise StartError(f"Ollama's pull of {model} answered a line over {PULL_LINE_MAX_BYTES // 1024} KiB")
                for line in lines:
                    if line.strip():
                        take(line.decode(errors="replace"))
            if rest.strip():
                take(rest.decode(errors="replace"))
    except httpx.HTTPError as exc:
        raise StartError(f"the pull of {model} from Ollama broke off: {exc or type(exc).__name__}") from None


async def _bounded_body(answer: httpx.Response) -> bytes:
    body = b""
    async for chunk in answer.aiter_bytes():
        body += chunk
        if len(body) > PULL_LINE_MAX_BYTES:
            break
    return body[:PULL_LINE_MAX_BYTES]
