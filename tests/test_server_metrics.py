"""The servers' own metrics re-exported on the daemon's /metrics: relabelled, cached per instance by one
reader, bounded against a hostile server, and dropped when the server stops."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from launcher.api.metrics import ServerSeriesCollector
from launcher.schema_instances import State
from launcher.supervise.server_metrics import ServerMetrics
from launcher.supervise.server_series import relabel
from tests.conftest import ConfigWriter, Daemon, poll_until

# What llama-server answers (this build's first lines, and a counter without _total as it has).
LLAMA_EXPOSITION = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed, excluding cached tokens
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 12
# HELP llamacpp:n_tokens_max Largest observed sequence length (prompt + generation)
# TYPE llamacpp:n_tokens_max counter
llamacpp:n_tokens_max 40
# HELP llamacpp:requests_processing Number of requests processing
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing{model="theirs"} 2
"""


def _exposed(families: dict[str, ServerMetrics]) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    registry = CollectorRegistry(auto_describe=True)
    for server_metrics in families.values():
        registry.register(ServerSeriesCollector(server_metrics))
    text = generate_latest(registry).decode()
    return {f.name: [(s.name, s.labels, s.value) for s in f.samples] for f in text_string_to_metric_families(text)}


def test_series_are_renamed_labelled_and_keep_their_type_and_help() -> None:
    families = {f.name: f for f in relabel(LLAMA_EXPOSITION, model="m", instance="m@1", max_series=100)}
    tokens = families["launcher_server_prompt_tokens"]
    assert tokens.type == "counter" and tokens.help.startswith("Number of prompt tokens")
    assert [(s.name, s.labels, s.value) for s in tokens.samples] == [
        ("launcher_server_prompt_tokens_total", {"model": "m", "instance": "m@1"}, 12.0)
    ]
    # a label of the server's own named like ours is kept under another name, never overwritten
    processing = families["launcher_server_requests_processing"]
    assert processing.samples[0].labels == {"exported_model": "theirs", "model": "m", "instance": "m@1"}
    # a counter without _total (llama.cpp's n_tokens_max) gets one, as prometheus_client's parser names it
    assert families["launcher_server_n_tokens_max"].samples[0].name == "launcher_server_n_tokens_max_total"


def test_too_many_series_or_garbage_is_refused() -> None:
    many = "".join(f"llamacpp:x{i} 1\n" for i in range(20))
    with pytest.raises(ValueError, match="more than 10 series"):
        relabel(many, model="m", instance="m", max_series=10)
    with pytest.raises(ValueError, match="could not convert"):
        relabel("this is { not an exposition\n", model="m", instance="m", max_series=10)


@dataclass(frozen=True)
class _Backend:
    name: str = "llama-server"


@dataclass(frozen=True)
class _Settings:
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class _Instance:
    port: int
    group: str = "m"
    state: State = State.READY
    backend: _Backend = field(default_factory=_Backend)
    settings: _Settings = field(default_factory=_Settings)


@asynccontextmanager
async def _server(answers: list[Callable[[asyncio.StreamWriter], object]]) -> AsyncIterator[int]:
    """A server on loopback that answers the n-th request with ``answers[n]`` (the last one repeats)."""
    served = 0
    release = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await reader.readuntil(b"\r\n\r\n")
        answer = answers[min(served, len(answers) - 1)]
        served += 1
        result = answer(writer)
        if result == "hang":
            await release.wait()
        else:
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        release.set()
        server.close()
        await server.wait_closed()


def _ok(body: str) -> Callable[[asyncio.StreamWriter], object]:
    def write(writer: asyncio.StreamWriter) -> None:
        data = body.encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(data) + data)

    return write


def _huge(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"llamacpp:x 1\n" * 200_000)


def _hang(writer: asyncio.StreamWriter) -> str:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nllamacpp:")
    return "hang"


async def test_a_server_that_misbehaves_keeps_its_last_values_and_is_marked_stale() -> None:
    answers = [_ok(LLAMA_EXPOSITION), _hang, _huge, _ok("garbage {{{\n"), _ok(LLAMA_EXPOSITION)]
    async with _server(answers) as port, httpx.AsyncClient() as http:
        instances = {"m": _Instance(port)}
        server_metrics = ServerMetrics(instances, http, lambda: 60.0, timeout_s=0.3, max_bytes=64 * 1024)
        await server_metrics.read_all()
        first = _exposed({"m": server_metrics})
        assert first["launcher_server_metrics_up"] == [
            ("launcher_server_metrics_up", {"model": "m", "instance": "m"}, 1)
        ]
        assert first["launcher_server_prompt_tokens"][0][2] == 12.0
        for why in ("TimeoutError", "over 65536 bytes", "ValueError"):
            await server_metrics.read_all()
            kept = server_metrics.series()["m"]
            assert kept.error is not None and why in kept.error, (why, kept.error)
            shown = _exposed({"m": server_metrics})
            assert shown["launcher_server_metrics_up"][0][2] == 0.0
            assert shown["launcher_server_prompt_tokens"] == first["launcher_server_prompt_tokens"]
            assert shown["launcher_server_metrics_age_seconds"][0][2] >= 0.0
        await server_metrics.read_all()
        assert server_metrics.series()["m"].error is None


# A server that writes names the daemon's own series have, or one name under two families.
HOSTILE_EXPOSITION = """\
# TYPE metrics_up gauge
metrics_up 0
# TYPE y counter
y_total 1
# TYPE y_total gauge
y_total 2
# TYPE x_bucket gauge
x_bucket 3
# TYPE x histogram
x_bucket{le="+Inf"} 1
x_count 1
x_sum 1
"""


async def test_a_server_cannot_write_a_name_twice_or_speak_for_the_daemon() -> None:
    async with _server([_ok(HOSTILE_EXPOSITION)]) as port, httpx.AsyncClient() as http:
        server_metrics = ServerMetrics({"m": _Instance(port)}, http, lambda: 60.0)
        await server_metrics.read_all()
        registry = CollectorRegistry(auto_describe=True)
        registry.register(ServerSeriesCollector(server_metrics))
        text = generate_latest(registry).decode()
    helps = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP")]
    assert len(helps) == len(set(helps)), text  # a strict reader (Go's expfmt) refuses a second HELP
    samples = [line.split()[0] for line in text.splitlines() if not line.startswith("#")]
    assert len(samples) == len(set(samples)), text
    assert 'launcher_server_metrics_up{instance="m",model="m"} 1.0' in text.splitlines()
    assert 'launcher_server_x_bucket{instance="m",model="m"} 3.0' in text.splitlines()


async def test_a_stopped_instance_drops_out_and_one_not_serving_is_never_asked() -> None:
    async with _server([_ok(LLAMA_EXPOSITION)]) as port:
        asked: list[str] = []
        transport = httpx.AsyncHTTPTransport()

        class Counting(httpx.AsyncBaseTransport):
            async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
                asked.append(str(request.url))
                return await transport.handle_async_request(request)

        async with httpx.AsyncClient(transport=Counting()) as counting:
            instances = {"a": _Instance(port, group="a"), "b": _Instance(port + 1, group="b", state=State.STOPPED)}
            server_metrics = ServerMetrics(instances, counting, lambda: 60.0)
            await server_metrics.read_all()
            assert asked == [f"http://127.0.0.1:{port}/metrics"]  # b, stopped, is not asked: nothing wakes it
            assert set(server_metrics.series()) == {"a"}
            instances["a"].state = State.STOPPED
            assert server_metrics.series() == {}  # gone at once, before the next read
            assert "launcher_server_prompt_tokens" not in _exposed({"x": server_metrics})


def test_a_real_daemon_reexports_each_servers_series_per_model(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon]
) -> None:
    config = write_config(
        {
            "a": {"autostart": True},
            # --metrics given already: not given twice; its /metrics needs its key, which is sent
            "b": {"autostart": True, "args": ["--metrics", "--api-key", "key-b,other"]},
            "lazy": {"on_demand": True},
        },
        gpus={"backend": "sim", "poll_interval": 0.2, "sim": [{"name": "Sim", "memory_mib": 8192}]},
    )
    daemon = start_daemon(config)
    for name in ("a", "b"):
        daemon.wait_for(name, lambda s: s["state"] == "ready")

    def served() -> dict[str, set[str]]:
        text = daemon.http.get("/metrics").text
        by_family: dict[str, set[str]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                by_family.setdefault(family.name, set()).add(sample.labels.get("model", ""))
        return by_family

    both = poll_until(served, lambda f: f.get("launcher_server_requests_processing") == {"a", "b"}, "series", 30)
    assert both["launcher_server_prompt_tokens"] == {"a", "b"}
    assert daemon.cli("down", "b").returncode == 0
    after = poll_until(served, lambda f: f.get("launcher_server_requests_processing") == {"a"}, "b gone", 30)
    assert after["launcher_server_metrics_up"] == {"a"}
    assert daemon.instance("lazy")["state"] == "stopped"  # many scrapes later, never woken
