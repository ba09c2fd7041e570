"""Ground truth for the planner: llama-server's own buffer sizes (`-lv 4`), per device.

Several real llama.cpp devices on a CPU machine: one `ggml-rpc-server` per simulated GPU, and
llama-server given `--rpc` with the planner's split. The planner's numbers for each device are then
compared with `model buffer size`, `KV buffer size` and `compute buffer size` of that RPC device.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.netns import Namespace
from launcher.backends import llama_log


@dataclass
class Buffers:
    """MiB per term for one device (or the host)."""

    model: float = 0.0
    kv: float = 0.0
    compute: float = 0.0
    state: float = 0.0  # recurrent state ("RS buffer"): Mamba, RWKV, hybrids

    @property
    def total(self) -> float:
        return self.model + self.kv + self.compute + self.state


@dataclass
class Reported:
    devices: dict[str, Buffers] = field(default_factory=dict)  # by RPC address
    host: Buffers = field(default_factory=Buffers)
    log: str = ""  # the server's output they were read from


def parse(log: str) -> Reported:
    """The server's buffers by RPC address and on the host: the launcher's own reader of its log
    (launcher/backends/llama_log.py), in the benchmark's terms."""
    reported = Reported(log=log)
    for where, mib in llama_log.parse(log).mib.items():
        buffers = Buffers(model=mib["weights"], kv=mib["kv"], compute=mib["compute"], state=mib["state"])
        if where.rpc is not None:
            reported.devices[where.rpc] = buffers
        elif where.host:
            reported.host = buffers
    return reported


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def rpc_servers(
    bin_dir: Path, count: int, hosts: Sequence[Namespace] = (), logs: Path | None = None
) -> Iterator[list[str]]:
    """``count`` ggml-rpc-servers on loopback, or one in each of ``hosts`` on its address; their addresses,
    in order. With ``logs``, each logs every buffer it allocates (GGML_RPC_DEBUG) to `rpc<i>.log` there:
    the exact bytes of each device (``allocations``)."""
    procs, addresses = [], []
    env = {**os.environ, "GGML_RPC_DEBUG": "1"} if logs else None
    try:
        for i in range(count):
            port = free_port()
            prefix, host = (hosts[i].run, hosts[i].inside) if hosts else ([], "127.0.0.1")
            out = (logs / f"rpc{i}.log").open("w") if logs else subprocess.DEVNULL
            argv = [*prefix, str(bin_dir / "ggml-rpc-server"), "-H", host, "-p", str(port)]
            procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env))
            if logs:
                out.close()  # type: ignore[union-attr]  # the child holds its own copy
            addresses.append(f"{host}:{port}")
        for address in addresses:
            _wait_listening(address)
        yield addresses
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


_ALLOC = re.compile(r"\[alloc_buffer\] device: \d+, size: (\d+)")


@dataclass(frozen=True)
class Allocated:
    """One RPC device's buffers in bytes, from its rpc-server's log, in llama.cpp's order: the model, the
    KV cache (two with a sliding window), compute, then a few KiB of the Meta device's own (in the total)."""

    weights_b: int
    kv_b: int
    compute_b: int
    total_b: int


def buffer_sizes(log: Path) -> list[int]:
    """Every buffer one logging rpc-server allocated, in bytes, in order."""
    return [int(size) for size in _ALLOC.findall(log.read_text())]


def allocations(logs: Path, count: int) -> list[Allocated]:
    """What each of the ``count`` rpc-servers logging to ``logs`` allocated (see ``rpc_servers``)."""
    found = []
    for i in range(count):
        sizes = buffer_sizes(logs / f"rpc{i}.log")
        large = [size for size in sizes if size >= 64 * 1024]
        found.append(Allocated(large[0], sum(large[1:-1]), large[-1], sum(sizes)))
    return found


def _wait_listening(address: str, timeout_s: float = 10) -> None:
    host, port = address.split(":")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"rpc server at {address} did not listen")


def measure(llama_server: Path, args: list[str], timeout_s: float = 60) -> Reported:
    """Run llama-server with ``args`` until it is ready (its buffers are all reserved by then), stop it
    and read its sizes from its output (which it flushes on exit: a pipe is block-buffered)."""
    port = free_port()
    argv = [str(llama_server), *args, "--host", "127.0.0.1", "--port", str(port), "-lv", "4"]
    return measure_argv(argv, port, None, timeout_s)


def measure_argv(argv: list[str], port: int, env: dict[str, str] | None, timeout_s: float = 60) -> Reported:
    """`measure` for a whole command line (with `-lv 4`) that serves on ``port``."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + timeout_s
        with httpx.Client() as client:
            while proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        break
                time.sleep(0.02)
    finally:
        proc.terminate()
        log, _ = proc.communicate(timeout=30)
    reported = parse(log)
    if not reported.devices and not reported.host.model:
        raise RuntimeError("llama-server reported no buffer sizes:\n" + log[-2000:])
    return reported
