"""The servers' own metrics (llama-server's /metrics), read by one owner on the GPU sampler's poll interval
and kept per instance, so that a scrape of the daemon's /metrics only reads this cache: it never waits on a
busy server, and never starts or wakes a model (only instances already serving are read, each on its own
port, never through the front door).

A server's answer is hostile input: it is read up to `_MAX_BYTES` within `_READ_TIMEOUT_S`, parsed by
prometheus_client's parser, and at most `_MAX_SERIES` series of it are kept. A server that does not answer
in time keeps its last values; `ServerSeries.read_at` says how old they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import httpx

from launcher.schema_instances import State
from launcher.server_args import arg_value
from launcher.supervise.server_series import Family, relabel

log = logging.getLogger("launcher")

_MAX_BYTES = 1024 * 1024  # llama-server's answer is about 3 KB
_MAX_SERIES = 2000
_READ_TIMEOUT_S = 2.0
# Read while it serves; an unhealthy one is not read (it does not answer) but keeps its last values.
_READ_STATES = frozenset({State.READY, State.DRAINING})
_KEPT_STATES = _READ_STATES | {State.UNHEALTHY}
# Backends whose server has a Prometheus endpoint. Ollama has none (ollama#3144): what it says of its
# models (/api/ps: size, size in VRAM) is in launcher_instance_model_bytes.
_WITH_METRICS = frozenset({"llama-server"})


class _Named(Protocol):
    @property
    def name(self) -> str: ...


class _Settings(Protocol):
    @property
    def args(self) -> list[str]: ...
    @property
    def env(self) -> dict[str, str]: ...


class ServingInstance(Protocol):
    """What is read of an instance (the instance table's `InstanceView` is one)."""

    @property
    def group(self) -> str: ...  # its configured model: the `model` label
    @property
    def state(self) -> State: ...
    @property
    def port(self) -> int | None: ...
    @property
    def backend(self) -> _Named: ...
    @property
    def settings(self) -> _Settings: ...  # its args and env: the server's API key, which /metrics needs


@dataclass(frozen=True)
class ServerSeries:
    """What one instance's server said last: its families relabelled, when that was read, and the error
    of the last read if it failed (the families are then the last good ones)."""

    model: str
    families: tuple[Family, ...]
    read_at: float | None  # seconds since the epoch; None: never read
    error: str | None = None


class ServerMetrics:
    """The owner of the cache: one task reads every serving instance's /metrics per poll interval."""

    def __init__(
        self,
        instances: Mapping[str, ServingInstance],
        http: httpx.AsyncClient,
        interval_s: Callable[[], float],
        *,
        timeout_s: float = _READ_TIMEOUT_S,
        max_bytes: int = _MAX_BYTES,
    ) -> None:
        """``interval_s``: the GPU sampler's poll interval, asked at each round (a reload changes it)."""
        self._instances = instances
        self._http = http
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._max_bytes = max_bytes
        self._cache: dict[str, ServerSeries] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="server-metrics")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def series(self) -> dict[str, ServerSeries]:
        """Per instance whose server runs now, its last series; a stopped one's are gone."""
        return {
            name: kept
            for name, kept in self._cache.items()
            if (instance := self._instances.get(name)) is not None and instance.state in _KEPT_STATES
        }

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            await self.read_all()
            await asyncio.sleep(max(0.0, self._interval_s() - (loop.time() - began)))

    async def read_all(self) -> None:
        """One round: read every serving instance at once, and forget the ones whose server ended."""
        serving = {
            name: instance
            for name, instance in self._instances.items()
            if instance.state in _KEPT_STATES and instance.backend.name in _WITH_METRICS
        }
        for gone in self._cache.keys() - serving.keys():
            del self._cache[gone]
        reads = [
            self._read(name, instance.group, instance.port, _api_key(instance.settings))
            for name, instance in serving.items()
            if instance.state in _READ_STATES and instance.port is not None
        ]
        await asyncio.gather(*reads)

    async def _read(self, name: str, model: str, port: int, api_key: str | None) -> None:
        kept = self._cache.get(name)
        try:
            async with asyncio.timeout(self._timeout_s):
                text = await self._fetch(port, api_key)
            families = await asyncio.to_thread(relabel, text, model=model, instance=name, max_series=_MAX_SERIES)
        except Exception as exc:  # whatever a hostile answer makes the parser raise is the server's fault, not ours
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if kept is None or kept.error is None:
                log.info("%s: its server's /metrics could not be read: %s", name, error)
            previous = kept.families if kept is not None else ()
            self._cache[name] = ServerSeries(model, previous, kept.read_at if kept else None, error)
            return
        self._cache[name] = ServerSeries(model, families, time.time())

    async def _fetch(self, port: int, api_key: str | None) -> str:
        url, headers = f"http://127.0.0.1:{port}/metrics", {"Authorization": f"Bearer {api_key}"} if api_key else {}
        async with self._http.stream("GET", url, headers=headers, timeout=self._timeout_s) as answer:
            if answer.status_code != 200:
                # 501 when the server runs without --metrics (the user's args turned it off)
                raise ValueError(f"HTTP {answer.status_code}")
            body = bytearray()
            async for chunk in answer.aiter_bytes():
                body += chunk
                if len(body) > self._max_bytes:
                    raise ValueError(f"answer over {self._max_bytes} bytes")
        return body.decode()


def _api_key(settings: _Settings) -> str | None:
    """The key a llama-server started with `--api-key` (or LLAMA_API_KEY) wants on every path but /health:
    its first, when several are given."""
    keys = arg_value(settings.args, "--api-key") or settings.env.get("LLAMA_API_KEY")
    return keys.split(",")[0] if keys else None
