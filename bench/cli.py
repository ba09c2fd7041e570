"""The command line and the REST API as users meet them: each figure beside a baseline from the same run.

Usage: .venv/bin/python -m bench.cli [--runs N] [--requests N] [--max-s S]

Only the public surfaces are driven: `python -m launcher ...`, the configuration file and the daemon's HTTP
API. One daemon (8 simulated 24 GiB GPUs, 4 tiny models running, `demo` and `big` stopped) answers it all:
1. `launcher status`, against `python -c pass` (the interpreter's floor);
2. `launcher up demo` (stopped before each run), against the bare llama-server's time to its first 200 on
   /health with the same argv (the daemon's own plan for `demo`, on another port);
3. the cumulative import time of `launcher.cli` (`python -X importtime`);
4. `GET /health` and `GET /gpus` on one kept-alive connection, and `GET /gpus` on 16 at once;
5. the refusal of a model that does not fit (a sparse header: 80 layers, 152064 tokens, ~200 GiB of q8_0):
   `launcher plan big` and `GET /plan/big`, while /health is probed every 10 ms on another connection.
The HTTP client is a few lines on asyncio streams, so that the client does not dominate a 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from bench.startup import bare_once
from launcher.config_yaml import dump_config_yaml
from launcher.tinymodel import write_tiny_llama

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TINY_INSTANCES = 4
SIM_GPUS = 8
CONNECTIONS = 16
PROBE_INTERVAL_S = 0.01
# /health "keeps answering" while a plan is made: no probe waits longer than 5 probe intervals.
PROBE_STALL_S = 5 * PROBE_INTERVAL_S
READY_TIMEOUT_S = 120.0
COMMAND_TIMEOUT_S = 120.0

# The model that does not fit 8 x 24 GiB: a 175B-class llama shape with Qwen's vocabulary, q8_0.
BIG_LAYERS, BIG_EMBD, BIG_HEADS, BIG_KV_HEADS, BIG_FF, BIG_VOCAB = 80, 12288, 96, 8, 57344, 152064


# ---- the big model's header ------------------------------------------------------------------------


def _q8_0_bytes(dims: tuple[int, ...]) -> int:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0]
    return math.prod(dims) // block * size


def _padded(offset: int) -> int:
    return -(-offset // gguf.GGUF_DEFAULT_ALIGNMENT) * gguf.GGUF_DEFAULT_ALIGNMENT


def write_big_header(path: Path) -> int:
    """A GGUF header of the big model whose data section is a sparse hole; returns the weights' bytes."""
    e, f, kv = BIG_EMBD, BIG_FF, BIG_EMBD // BIG_HEADS * BIG_KV_HEADS
    per_layer = {"attn_norm": (e,), "attn_q": (e, e), "attn_k": (kv, e), "attn_v": (kv, e), "attn_output": (e, e),
                 "ffn_norm": (e,), "ffn_gate": (f, e), "ffn_up": (f, e), "ffn_down": (e, f)}  # fmt: skip
    tensors = {"token_embd.weight": (BIG_VOCAB, e), "output_norm.weight": (e,), "output.weight": (BIG_VOCAB, e)}
    tensors |= {f"blk.{i}.{name}.weight": dims for i in range(BIG_LAYERS) for name, dims in per_layer.items()}
    writer = gguf.GGUFWriter(str(path), "llama")
    counts = {"block_count": BIG_LAYERS, "context_length": 32768, "embedding_length": e, "feed_forward_length": f,
              "attention.head_count": BIG_HEADS, "attention.head_count_kv": BIG_KV_HEADS}  # fmt: skip
    for key, value in counts.items():
        writer.add_uint32(f"llama.{key}", value)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(BIG_VOCAB)])
    writer.add_token_types([gguf.TokenType.NORMAL] * BIG_VOCAB)
    weights = 0
    for name, dims in tensors.items():
        kind = gguf.GGMLQuantizationType.Q8_0 if len(dims) > 1 else gguf.GGMLQuantizationType.F32
        nbytes = _q8_0_bytes(dims) if len(dims) > 1 else 4 * math.prod(dims)
        writer.add_tensor_info(name, dims, np.dtype(np.float32), nbytes, raw_dtype=kind)
        weights += _padded(nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    header = path.stat().st_size
    os.truncate(path, _padded(header) + weights)  # full length, no blocks: never read, never loaded
    return weights


# ---- a minimal HTTP/1.1 keep-alive client ------------------------------------------------------------


class Connection:
    """One kept-alive HTTP/1.1 connection to 127.0.0.1: one request at a time, Content-Length bodies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def get(self, path: str) -> tuple[int, bytes]:
        self._writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        status, headers = await self.read_head(f"GET {path}")
        if b"content-length" not in headers:
            raise ConnectionError(f"GET {path}: an answer without Content-Length")
        return status, await self._reader.readexactly(int(headers[b"content-length"]))

    async def read_head(self, what: str) -> tuple[int, dict[bytes, bytes]]:
        """An answer's status and headers (names in lower case)."""
        status_line = await self._reader.readline()
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ConnectionError(f"{what}: no HTTP answer ({status_line!r})")
        headers = {}
        while (line := await self._reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers

    async def get_ok(self, path: str) -> bytes:
        status, body = await self.get(path)
        if status != 200:
            raise RuntimeError(f"GET {path} answered {status}: {body[:200]!r}")
        return body

    async def close(self) -> None:
        self._writer.close()
        await self._writer.wait_closed()


async def timed_gets(conn: Connection, path: str, count: int, deadline: float) -> list[float]:
    """Seconds per request of up to ``count`` requests in a row, stopping at ``deadline``."""
    latencies_s: list[float] = []
    while len(latencies_s) < count and time.perf_counter() < deadline:
        began = time.perf_counter()
        await conn.get_ok(path)
        latencies_s.append(time.perf_counter() - began)
    return latencies_s


async def keepalive_latency(port: int, path: str, requests: int, max_s: float) -> list[float]:
    conn = await Connection.open(port)
    try:
        await timed_gets(conn, path, 20, math.inf)  # warm: the first answers of a connection
        return await timed_gets(conn, path, requests, time.perf_counter() + max_s)
    finally:
        await conn.close()


async def concurrent_latency(port: int, path: str, requests: int, max_s: float) -> tuple[list[float], float]:
    """Latencies of ``requests`` spread over CONNECTIONS connections at once, and requests per second."""
    conns = [await Connection.open(port) for _ in range(CONNECTIONS)]
    try:
        await asyncio.gather(*(timed_gets(c, path, 5, math.inf) for c in conns))
        deadline = time.perf_counter() + max_s
        began = time.perf_counter()
        per_conn = await asyncio.gather(*(timed_gets(c, path, requests // CONNECTIONS, deadline) for c in conns))
        wall_s = time.perf_counter() - began
    finally:
        for conn in conns:
            await conn.close()
    latencies_s = [x for one in per_conn for x in one]
    return latencies_s, len(latencies_s) / wall_s


async def wait_healthy(port: int, timeout_s: float) -> None:
    """Until GET /health answers 200: every autostart instance is ready."""
    deadline = time.perf_counter() + timeout_s
    conn = await Connection.open(port)
    try:
        while (await conn.get("/health"))[0] != 200:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"the daemon's /health is not 200 after {timeout_s:g}s")
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


async def while_probing(port: int, work: Callable[[], Awaitable[None]]) -> tuple[float, list[float]]:
    """Seconds ``work`` takes, and the latencies of /health probes (every PROBE_INTERVAL_S on their own
    connection) that were under way while it ran."""
    conn = await Connection.open(port)
    await conn.get_ok("/health")
    stop = asyncio.Event()
    probes: list[tuple[float, float]] = []  # (sent at, seconds)

    async def probe() -> None:
        next_at = time.perf_counter()
        while not stop.is_set():
            sent = time.perf_counter()
            await conn.get_ok("/health")
            probes.append((sent, time.perf_counter() - sent))
            next_at = max(next_at + PROBE_INTERVAL_S, time.perf_counter())
            await asyncio.sleep(next_at - time.perf_counter())

    prober = asyncio.create_task(probe())
    try:
        await asyncio.sleep(3 * PROBE_INTERVAL_S)  # probes flowing before the work starts
        began = time.perf_counter()
        await work()
        ended = time.perf_counter()
    finally:
        stop.set()
        await prober
        await conn.close()
    return ended - began, [took for sent, took in probes if sent < ended and sent + took > began]


# ---- processes ---------------------------------------------------------------------------------------


def child_env(root: Path = REPO) -> dict[str, str]:
    """This environment without LAUNCHER_* overrides, importing the launcher of the checkout at ``root``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAUNCHER_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)
    return env


ENV = child_env()


def run(argv: list[str], rc: int = 0) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Wall seconds of ``argv``, which must exit with ``rc``."""
    began = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=COMMAND_TIMEOUT_S)
    took_s = time.perf_counter() - began
    if done.returncode != rc:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}, not {rc}: {done.stderr[-2000:]}")
    return took_s, done


def import_times() -> tuple[float, dict[str, float]]:
    """`import launcher.cli`'s cumulative seconds, and those of the top-level packages it imports. The
    report lists each import after the ones it caused, indented by depth: launcher.cli's are the lines
    since the previous line of depth 0."""
    _took, done = run([PYTHON, "-X", "importtime", "-c", "import launcher.cli"])
    below: dict[str, float] = {}
    for line in done.stderr.splitlines():
        fields = line.removeprefix("import time:").split("|")
        if not line.startswith("import time:") or len(fields) != 3 or not fields[1].strip().isdigit():
            continue
        name, seconds = fields[2].strip(), int(fields[1]) / 1e6
        if fields[2].startswith("  "):  # deeper than 0
            below[name] = seconds
        elif name == "launcher.cli":
            return seconds, {k: v for k, v in below.items() if "." not in k}
        else:
            below = {}
    raise RuntimeError(f"no launcher.cli line in `python -X importtime`: {done.stderr[-2000:]}")


class Daemon:
    """`launcher serve` on a config of our own, its output in a file; stopped with SIGTERM."""

    def __init__(self, config: Path, log: Path, argv: list[str] | None = None, root: Path = REPO) -> None:
        """``argv``: another command that serves ``config`` the same way (a bench's own entry point);
        ``root``: the checkout whose launcher it runs (another one's: a baseline)."""
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv or [PYTHON, "-m", "launcher", "--config", str(config), "serve"],
                stdout=out, stderr=subprocess.STDOUT, env=ENV if root == REPO else child_env(root), cwd=root,
            )  # fmt: skip

    def wait_listening(self, timeout_s: float) -> None:
        deadline = time.perf_counter() + timeout_s
        while "listening on" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.perf_counter() > deadline:
                raise RuntimeError(f"the daemon did not start; its log ends:\n{self.tail()}")
            time.sleep(0.05)

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])

    def stop(self) -> None:
        """SIGTERM (the daemon stops its servers), then wait; SIGKILL only if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"the daemon ignored SIGTERM for 60 s; its log ends:\n{self.tail()}") from None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_port_range(count: int) -> tuple[int, int]:
    """``count`` consecutive ports that are all free now."""
    for _ in range(100):
        first = random.randrange(20000, 60000 - count)
        try:
            for port in range(first, first + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first, first + count - 1
    raise RuntimeError(f"no {count} consecutive free ports found")


def write_config(tmp: Path, tiny: Path, big: Path, port: int) -> Path:
    gpus = [{"name": f"Simulated 24 GiB GPU {i}", "memory_mib": 24576} for i in range(SIM_GPUS)]
    models: dict[str, Any] = {
        f"tiny{i}": {"model": str(tiny), "ctx": 256, "port": "auto", "autostart": True, "env": {}}
        for i in range(TINY_INSTANCES)
    }
    models["demo"] = {"model": str(tiny), "ctx": 2048, "port": "auto", "env": {}}
    models["big"] = {"model": str(big), "ctx": 8192, "autostart": False}
    config = {
        "daemon": {
            "host": "127.0.0.1",
            "port": port,
            "state_dir": str(tmp / "state"),
            "instance_ports": list(free_port_range(16)),
        },
        "gpus": {"backend": "sim", "poll_interval": 1.0, "sim": gpus},
        "models": models,
    }
    path = tmp / "launcher.yaml"
    path.write_text(dump_config_yaml(config))
    return path


# ---- the measures ------------------------------------------------------------------------------------


@dataclass
class CliTimes:
    floor_s: list[float]
    status_s: list[float]
    import_s: list[float]
    packages_s: list[dict[str, float]]
    bare_s: list[float]
    up_s: list[float]


def bare_argv(api_port: int, port: int) -> list[str]:
    """The daemon's own command line for `demo`, on ``port``."""
    plan = json.loads(asyncio.run(get_once(api_port, "/plan/demo")))
    argv: list[str] = plan["command"]
    argv[argv.index("--port") + 1] = str(port)
    return argv


async def get_once(port: int, path: str) -> bytes:
    conn = await Connection.open(port)
    try:
        return await conn.get_ok(path)
    finally:
        await conn.close()


def cli_times(config: Path, api_port: int, runs: int) -> CliTimes:
    """Items 1 to 3, interleaved run by run so that both sides of each pair meet the same machine."""
    launcher = [PYTHON, "-m", "launcher", "--config", str(config)]
    bare_port = free_port()
    argv = bare_argv(api_port, bare_port)
    times = CliTimes([], [], [], [], [], [])
    for _ in range(runs):
        times.floor_s.append(run([PYTHON, "-c", "pass"])[0])
        times.status_s.append(run([*launcher, "status"])[0])
        cli_s, packages = import_times()
        times.import_s.append(cli_s)
        times.packages_s.append(packages)
        times.bare_s.append(bare_once(argv, bare_port))
        run([*launcher, "down", "demo"])
        times.up_s.append(run([*launcher, "up", "demo"])[0])
    run([*launcher, "down", "demo"])
    return times


@dataclass
class ApiTimes:
    health_s: list[float]
    gpus_s: list[float]
    gpus_many_s: list[float]
    gpus_many_per_s: float


async def api_times(port: int, requests: int, max_s: float) -> ApiTimes:
    health = await keepalive_latency(port, "/health", requests, max_s)
    gpus = await keepalive_latency(port, "/gpus", requests, max_s)
    many, per_s = await concurrent_latency(port, "/gpus", requests, max_s)
    return ApiTimes(health, gpus, many, per_s)


@dataclass
class PlanTimes:
    cli_s: list[float]
    cli_probes_s: list[float]
    cold_s: list[float]
    cold_probes_s: list[float]
    warm_s: list[float]


async def plan_times(config: Path, big: Path, port: int, runs: int) -> PlanTimes:
    """Item 5. Touching the file before a request makes the daemon read the header again (its cache of
    model shapes is keyed by mtime), as for a model it has not planned yet."""
    argv = [PYTHON, "-m", "launcher", "--config", str(config), "plan", "big"]
    conn = await Connection.open(port)
    times = PlanTimes([], [], [], [], [])

    async def cli_plan() -> None:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=ENV, cwd=REPO
        )
        out, err = await proc.communicate()
        if proc.returncode != 1:
            raise RuntimeError(f"`launcher plan big` exited {proc.returncode}, not 1: {(out + err)[-2000:]!r}")

    async def http_plan() -> None:
        if json.loads(await conn.get_ok("/plan/big"))["fits"]:
            raise RuntimeError("the big model fits: the benchmark needs one that does not")

    try:
        for _ in range(runs):
            os.utime(big, ns=(time.time_ns(), time.time_ns()))
            took_s, probes_s = await while_probing(port, cli_plan)
            times.cli_s.append(took_s)
            times.cli_probes_s += probes_s
            os.utime(big, ns=(time.time_ns(), time.time_ns()))
            took_s, probes_s = await while_probing(port, http_plan)
            times.cold_s.append(took_s)
            times.cold_probes_s += probes_s
            began = time.perf_counter()
            await http_plan()
            times.warm_s.append(time.perf_counter() - began)
    finally:
        await conn.close()
    return times


# ---- the table ---------------------------------------------------------------------------------------


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


@dataclass
class Row:
    measure: str
    values_s: list[float]
    baseline: tuple[str, float] | None = None  # (what, seconds)
    target: str = ""
    met: bool | None = None

    def line(self) -> str:
        med = statistics.median(self.values_s)
        tail = f"{p99(self.values_s) * 1000:.2f}" if len(self.values_s) >= 100 else "-"
        base = over = "-"
        if self.baseline is not None:
            what, base_s = self.baseline
            base = f"{what} {base_s * 1000:.2f}"
            over = f"{(med - base_s) * 1000:+.2f} ms ({med / base_s:.2f}x)"
        met = {None: "-", True: "yes", False: "**no**"}[self.met]
        cells = [self.measure, str(len(self.values_s)), f"{med * 1000:.2f}", tail,
                 f"{max(self.values_s) * 1000:.2f}", base, over, self.target or "-", met]  # fmt: skip
        return "| " + " | ".join(cells) + " |"


def rows(cli: CliTimes, api: ApiTimes, plan: PlanTimes) -> list[Row]:
    med = statistics.median
    floor, status, bare = med(cli.floor_s), med(cli.status_s), med(cli.bare_s)
    health, gpus = med(api.health_s), med(api.gpus_s)
    return [
        Row("1. `python -c pass` (floor)", cli.floor_s),
        Row("1. `launcher status`", cli.status_s, ("floor", floor), "<= floor + 150 ms", status - floor <= 0.150),
        Row("2. bare llama-server to first 200 on /health", cli.bare_s),
        Row("2. `launcher up demo` via daemon (whole command)", cli.up_s, ("bare", bare), "<= bare + 300 ms",
            med(cli.up_s) - bare <= 0.300),
        Row("3. `import launcher.cli` (cumulative, -X importtime)", cli.import_s, None, "< 120 ms",
            med(cli.import_s) < 0.120),
        Row("4. `GET /health`, 1 kept-alive connection", api.health_s, None, "p50 < 2 ms", health < 0.002),
        Row("4. `GET /gpus` (8 GPUs), 1 kept-alive connection", api.gpus_s, ("/health", health), "p50 < 2 ms",
            gpus < 0.002),
        Row(f"4. `GET /gpus`, {CONNECTIONS} connections at once ({api.gpus_many_per_s:.0f} req/s)",
            api.gpus_many_s, ("1 conn", gpus), "p99 < 10 ms", p99(api.gpus_many_s) < 0.010),
        Row("5. `launcher plan big` (refused, exit 1; header read)", plan.cli_s, ("status", status), "< 200 ms",
            med(plan.cli_s) < 0.200),
        Row("5. /health every 10 ms during `launcher plan big`", plan.cli_probes_s, ("idle", health),
            "keeps answering (max < 50 ms)", max(plan.cli_probes_s) < PROBE_STALL_S),
        Row("5. `GET /plan/big` (refused; header read)", plan.cold_s, None, "< 200 ms", med(plan.cold_s) < 0.200),
        Row("5. /health every 10 ms during `GET /plan/big`", plan.cold_probes_s, ("idle", health),
            "keeps answering (max < 50 ms)", max(plan.cold_probes_s) < PROBE_STALL_S),
        Row("5. `GET /plan/big` (refused; header cached)", plan.warm_s, ("header read", med(plan.cold_s))),
    ]  # fmt: skip


def heaviest_imports(packages_s: list[dict[str, float]], most: int = 8) -> str:
    names = {name for one in packages_s for name in one} - {"launcher"}
    medians = {name: statistics.median(one.get(name, 0.0) for one in packages_s) for name in names}
    top = sorted(medians.items(), key=lambda item: -item[1])[:most]
    return ", ".join(f"{name} {seconds * 1000:.0f}" for name, seconds in top)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=9, help="runs of each command (items 1, 2, 3, 5)")
    parser.add_argument("--requests", type=int, default=2000, help="requests per API latency measure (item 4)")
    parser.add_argument("--max-s", type=float, default=30.0, help="at most this long per API latency measure")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp_name:
        tmp = Path(tmp_name)
        tiny = write_tiny_llama(tmp / "tiny.gguf")
        big = tmp / "big.gguf"
        big_gib = write_big_header(big) / 2**30
        api_port = free_port()
        config = write_config(tmp, tiny, big, api_port)
        daemon = Daemon(config, tmp / "daemon.log")
        try:
            daemon.wait_listening(READY_TIMEOUT_S)
            asyncio.run(wait_healthy(api_port, READY_TIMEOUT_S))
            cli = cli_times(config, api_port, args.runs)
            api = asyncio.run(api_times(api_port, args.requests, args.max_s))
            plan = asyncio.run(plan_times(config, big, api_port, args.runs))
        finally:
            daemon.stop()
    print(
        f"runs: {args.runs} per command; {args.requests} requests per API measure; {os.cpu_count()} cores; "
        f"daemon: {SIM_GPUS} simulated 24 GiB GPUs, {TINY_INSTANCES} tiny llama-servers ready; "
        f"`big`: {BIG_LAYERS} layers, {BIG_VOCAB} tokens, {big_gib:.0f} GiB q8_0 (sparse header)"
    )
    print()
    print("| measure | n | median / p50 ms | p99 ms | max ms | baseline (same run) ms | vs baseline | target | met |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows(cli, api, plan):
        print(row.line())
    print()
    print(f"heaviest imports under `import launcher.cli` (cumulative ms, median): {heaviest_imports(cli.packages_s)}")


if __name__ == "__main__":
    main()
