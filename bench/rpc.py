"""A model split across hosts against the same model on one host: tokens per second, load time, and the bytes
that really cross to the RPC servers per generated token beside the plan's network figure.

Usage: .venv/bin/python -m bench.rpc [--runs 5] [--tokens 128] [--netns]

On loopback, on a CPU build: "one host" is llama-server with the model on its CPU; "1 RPC device" puts every
layer on one ggml-rpc-server (what the RPC protocol costs alone); "2 RPC devices" is the planner's split over
two ggml-rpc-servers (two hosts' worth: each token crosses to the first, from it to the second through
llama-server, and back); "-sm tensor" runs both devices on every layer, each with half of every matrix and of
the KV cache, their partial results summed between them. Bytes are those on the rpc-servers' connections
(TCP_INFO, `ss -i`) over a generation, less those of a one-token one: activations, and every RPC command with
its serialised graph, which the plan's figure (activations and logits only) leaves out. --netns (root) adds
the planned split with each ggml-rpc-server in a network namespace of its own, reached over a veth pair at a
private address (as the namespaced test's workers are): the kernel's path between hosts rather than
loopback's.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from bench.netns import namespace, unavailable
from bench.realbuffers import free_port, rpc_servers
from launcher.backends.llama_server import find_llama_server
from launcher.config_model import ModelSettings
from launcher.plan.estimate import ModelShape
from launcher.plan.gguf import read_gguf
from launcher.plan.layout import Layout, UsableGpu
from launcher.plan.remote import Endpoint, Remote, across_hosts, network_cost
from launcher.plan.runtime import runtime_for
from launcher.tinymodel import TinyShape, write_tiny_llama

SHAPE = TinyShape(n_layer=8, n_embd=512, n_head=8, n_head_kv=2, n_ff=2048, weight_type="q8_0")  # the test's
CTX = 512


def _io_bytes(addresses: list[str]) -> int:
    """Bytes sent and received so far on the connections to ``addresses`` (the kernel's TCP_INFO counters,
    as `ss -i` shows them: ggml-rpc uses send/recv, which /proc/PID/io does not count). Read on
    llama-server's end (dport): a server in a network namespace has its end there, out of this one's sight."""
    total = 0
    for address in addresses:
        port = address.rsplit(":", 1)[1]
        shown = subprocess.run(
            ["ss", "-Htin", "state", "established", f"( dport = :{port} )"], capture_output=True, text=True, check=True
        ).stdout
        for word in shown.split():
            if word.startswith(("bytes_sent:", "bytes_received:")):
                total += int(word.split(":")[1])
    return total


def run(server: Path, model: Path, extra: list[str], servers: list[str], runs: int, tokens: int) -> dict[str, float]:
    port = free_port()
    argv = [str(server), "-m", str(model), "-c", str(CTX), "--host", "127.0.0.1", "--port", str(port), *extra]
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            while True:
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None:
                    raise RuntimeError(f"llama-server exited with {proc.returncode}: {argv}")
                time.sleep(0.01)
            load_s = time.perf_counter() - started
            body = {"prompt": "hello", "n_predict": tokens, "ignore_eos": True, "cache_prompt": False}
            speeds, per_token = [], []
            for _ in range(runs):
                before = _io_bytes(servers) if servers else 0
                timings = client.post("/completion", json=body).json()["timings"]
                empty = _io_bytes(servers) if servers else 0
                client.post("/completion", json={**body, "n_predict": 1})
                one = (_io_bytes(servers) - empty) if servers else 0
                speeds.append(timings["predicted_per_second"])
                # A generation of N tokens less one of 1 token: what N-1 generated tokens moved.
                per_token.append(((empty - before) - one) / (tokens - 1) if servers else 0)
    finally:
        proc.terminate()
        proc.wait(30)
    return {"load_s": load_s, "tps": statistics.median(speeds), "bytes": statistics.median(per_token)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--netns", action="store_true", help="add the split over two namespaced hosts (root)")
    args = parser.parse_args()
    if args.netns and (why := unavailable()) is not None:
        parser.error(f"--netns: {why}")
    server = find_llama_server(None)
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_llama(Path(tmp) / "split.gguf", SHAPE)
        size_mib = model.stat().st_size >> 20
        shape = ModelShape.of(read_gguf(model))
        runtime = runtime_for(ModelSettings(model=model, ctx=CTX), shape, on_gpu=True)
        rows: list[tuple[str, dict[str, float], Layout | None]] = [
            ("one host (CPU)", run(server, model, ["-ngl", "0"], [], args.runs, args.tokens), None)
        ]
        setups = [("1 RPC device", 1, False, "layer"), ("2 RPC devices (planned split)", 2, False, "layer")]
        setups += [("2 RPC devices, -sm tensor (both work on every layer)", 2, False, "tensor")]
        netns = "2 RPC devices (planned split), each in a network namespace"
        setups += [(netns, 2, True, "layer")] if args.netns else []
        for name, count, namespaced, mode in setups:
            with contextlib.ExitStack() as stack:
                hosts = [stack.enter_context(namespace(i)) for i in range(count)] if namespaced else []
                addresses = stack.enter_context(rpc_servers(server.parent, count, hosts))
                room_mib = 47 if count > 1 else 999  # one device takes it all; two split it as two hosts would
                remote = Remote(
                    tuple(
                        Endpoint(
                            f"h{i}", a, (UsableGpu(0, f"u{i}", "sim", room_mib, room_mib, host=f"h{i}", endpoint=a),)
                        )
                        for i, a in enumerate(addresses)
                    )
                )
                layout = across_hosts(shape, runtime, [], remote, 0)
                assert layout is not None and len(layout.devices) == count
                argv = ["--rpc", ",".join(addresses), "-ngl", "99", "--fit", "off"]
                argv += ["-ts", ",".join(f"{c:g}" for c in layout.split)] if layout.split and mode == "layer" else []
                argv += ["-sm", "tensor", "-ts", "1,1", "-fa", "on"] if mode == "tensor" else []
                planned = layout if mode == "layer" else None  # the plan's network figure is the pipeline's
                rows.append((name, run(server, model, argv, addresses, args.runs, args.tokens), planned))
    print(f"runs: {args.runs}, {args.tokens} tokens each, model {SHAPE} ({size_mib} MiB), ctx {CTX}\n")
    print("| setup | load s | tokens/s | bytes to/from rpc-servers per generated token (measured) | plan's figure |")
    print("|---|---|---|---|---|")
    for name, found, planned in rows:
        cost = network_cost(shape, planned) if planned is not None else None
        figure = str(cost.bytes_per_generated_token) if cost is not None else "-"
        measured = f"{found['bytes']:.0f}" if found["bytes"] else "-"
        print(f"| {name} | {found['load_s']:.2f} | {found['tps']:.1f} | {measured} | {figure} |")


if __name__ == "__main__":
    main()
