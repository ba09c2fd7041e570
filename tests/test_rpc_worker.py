"""rpc-server workers (llama.cpp's RPC backend): where they may listen, the HELLO probe against real and
older servers, a real ggml-rpc-server supervised by a real daemon, used by a real llama-server, and
`launcher doctor` on exposed ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import struct
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from launcher.backends.rpc_server import RpcServerBackend, find_rpc_server
from launcher.config_file import parse_settings
from launcher.doctor_ports import rpc_exposure
from launcher.errors import ConfigError
from launcher.rpc.sockets import sockets_on
from launcher.rpc.wire import say_hello
from tests.conftest import ConfigWriter, Daemon, free_port, poll_until, run_cli

SIM = {"name": "Sim 24G", "memory_mib": 24576}


# ---- configuration ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rpc: {listen: 0.0.0.0}", "rpc.listen: 0.0.0.0 is a wildcard address"),
        ("rpc: {listen: 8.8.8.8}", "rpc.listen: 8.8.8.8 is a public address"),
        ("rpc: {listen: localhost}", "rpc.listen: 'localhost' is not an IPv4 address"),
        ("models: {w: {backend: rpc-server, model: a.gguf, ctx: 4}}", "models.w: model, ctx: not for an rpc-server"),
        ("models: {w: {backend: rpc-server, gpus: []}}", "models.w: an rpc-server with gpus: [] lends nothing"),
        ("models: {m: {backend: llama-server}}", "models.m.model: Field required"),
        ("peers: [{url: 'ftp://box:8400'}]", "peers.0.url: should be the http:// or https:// URL"),
        (
            "peers: [{url: 'http://box:8400'}, {url: 'http://box:8400/'}]",
            "peers: http://box:8400 listed more than once",
        ),
    ],
)
def test_refused_at_load_in_one_line(text: str, expected: str, tmp_path: Path) -> None:
    path = tmp_path / "launcher.yaml"
    with pytest.raises(ConfigError) as caught:
        parse_settings(text, path)
    assert str(caught.value).startswith(f"{path}: {expected}")
    assert len(str(caught.value).splitlines()) == 1


@pytest.mark.parametrize("listen", ["127.0.0.1", "10.1.2.3", "172.20.0.9", "192.168.1.5", "100.101.102.103"])
def test_loopback_and_private_addresses_are_taken(listen: str, tmp_path: Path) -> None:
    assert parse_settings(f"rpc: {{listen: {listen}}}", tmp_path / "l.yaml").rpc.listen == listen


def test_a_public_listen_needs_allow_public_and_peers_resolve_their_token(tmp_path: Path) -> None:
    text = "rpc: {listen: 0.0.0.0, allow_public: true}\npeers: [{url: 'http://box:8400/', token_file: t}]"
    settings = parse_settings(text, tmp_path / "l.yaml")
    assert settings.rpc.listen == "0.0.0.0"
    assert [(p.url, p.token_file) for p in settings.peers] == [("http://box:8400", tmp_path / "t")]


# ---- the HELLO probe --------------------------------------------------------------------------------------

_HELLO_V4 = bytes([14]) + struct.pack("<Q", 24) + bytes(24)  # what llama-server says first (protocol 4+)


@pytest.fixture
def rpc_server(marked_env: dict[str, str]) -> Iterator[int]:
    """A real ggml-rpc-server on loopback; its port, once it answers."""
    port = free_port()
    proc = subprocess.Popen(
        [str(find_rpc_server(None)), "--host", "127.0.0.1", "--port", str(port)],
        env=marked_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        poll_until(lambda: asyncio.run(say_hello("127.0.0.1", port, 1)), bool, "the rpc-server's HELLO", 30)
        yield port
        assert proc.poll() is None, f"the rpc-server died (exit {proc.returncode})"
    finally:
        proc.terminate()
        proc.wait()


async def test_hello_gives_the_version_and_devices(rpc_server: int) -> None:
    hello = await say_hello("127.0.0.1", rpc_server, 5)
    assert hello is not None
    assert hello.version[0] >= 4 and hello.devices == 1  # this build: protocol 7, the CPU as its one device
    assert await say_hello("127.0.0.1", free_port(), 5) is None  # nothing listens


@contextlib.asynccontextmanager
async def attached(port: int) -> AsyncIterator[str]:
    """A client that said HELLO and holds the server, as an attached llama-server does; its address."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_HELLO_V4)
    (size,) = struct.unpack("<Q", await reader.readexactly(8))
    await reader.readexactly(size)
    host, client_port = writer.get_extra_info("sockname")
    try:
        yield f"{host}:{client_port}"
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_busy_server_is_healthy_and_a_probe_that_gives_up_does_not_kill_it(rpc_server: int) -> None:
    async with attached(rpc_server) as client, httpx.AsyncClient() as http:
        assert sockets_on(rpc_server).clients == [client]
        # One client at a time: a HELLO waits behind it, and the probe gives up...
        assert await say_hello("127.0.0.1", rpc_server, 0.3) is None
        # ...but health reads the socket table: listening, and serving a client.
        assert (await RpcServerBackend("127.0.0.1").health(http, rpc_server, 0.3)).ok
    # The given-up HELLO was reset, not left queued: answering it into a closed socket would SIGPIPE the
    # server (the fixture checks that it still runs).
    assert await say_hello("127.0.0.1", rpc_server, 5) is not None


async def test_a_protocol_3_server_is_understood() -> None:
    """Protocol 3 took an empty HELLO and answered three bytes; it drops a HELLO of another size."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        command, size = struct.unpack("<BQ", await reader.readexactly(9))
        if command == 14 and size == 0:
            writer.write(struct.pack("<Q", 3) + bytes([3, 0, 0]))
            assert struct.unpack("<BQ", await reader.readexactly(9)) == (15, 0)
            writer.write(struct.pack("<QI", 4, 2))
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        hello = await say_hello("127.0.0.1", server.sockets[0].getsockname()[1], 5)
    assert hello is not None and (hello.protocol, hello.devices) == ("3.0.0", 2)


# ---- a real worker under a real daemon ----------------------------------------------------------------


def test_a_supervised_rpc_server_lends_its_gpu_to_a_llama_server(
    write_config: ConfigWriter,
    start_daemon: Callable[[Path], Daemon],
    llama_server: Path,
    tiny_model: Path,
    marked_env: dict[str, str],
    tmp_path: Path,
) -> None:
    worker_entry: dict[str, Any] = {"backend": "rpc-server", "model": None, "ctx": None, "gpus": [1]}
    worker_entry |= {"autostart": True, "restart": {"backoff_initial": 0.1}}
    config = write_config({"tiny": {}, "worker": worker_entry}, gpus={"backend": "sim", "sim": [SIM, SIM]})
    daemon = start_daemon(config)
    worker = daemon.wait_for("worker", lambda i: i["state"] == "ready")
    # Free MiB as the sampler reads them: once a reading follows the rpc-server's own claim (the driver's
    # context on the GPU it lends, 512 MiB), the simulated GPU shows it.
    [endpoint] = poll_until(
        lambda: daemon.http.get("/rpc").json()["endpoints"],
        lambda found: len(found) == 1 and found[0]["devices"][0]["memory_free_mib"] == 24576 - 512,
        "the worker's endpoint with the GPU's reading",
        10,
    )
    gpu1 = daemon.http.get("/gpus").json()[1]
    assert endpoint["name"] == "worker" and endpoint["endpoint"] == f"127.0.0.1:{worker['port']}"
    # Usable by a peer: the free MiB less this host's margin (1024 by default).
    assert endpoint["devices"] == [
        {
            "gpu": 1,
            "uuid": gpu1["uuid"],
            "name": "Sim 24G",
            "memory_total_mib": 24576,
            "memory_free_mib": 24064,
            "usable_mib": 24064 - 1024,
        }
    ]
    assert (endpoint["server_devices"], endpoint["clients"], endpoint["claims"]) == (1, [], [])
    # The front door neither lists nor routes to it.
    assert [m["id"] for m in daemon.http.get("/v1/models").json()["data"]] == ["tiny"]
    asked = daemon.http.post("/v1/chat/completions", json={"model": "worker", "messages": []})
    assert asked.status_code == 404 and asked.json()["error"]["code"] == "model_not_found"

    # A llama-server pointed at the endpoint puts the model's layers on it and generates.
    port, log = free_port(), tmp_path / "llama-server.log"
    argv = [str(llama_server), "-m", str(tiny_model), "-c", "256", "-ngl", "99", "-lv", "4"]
    argv += ["--rpc", endpoint["endpoint"], "--host", "127.0.0.1", "--port", str(port)]
    with log.open("w") as out:
        client = subprocess.Popen(argv, env=marked_env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        poll_until(lambda: _status(f"{url}/health"), lambda s: s == 200, "llama-server over RPC", 60)
        completion = httpx.post(f"{url}/completion", json={"prompt": "hi", "n_predict": 4}, timeout=60)
        assert completion.status_code == 200 and completion.json()["tokens_predicted"] == 4
        [busy] = daemon.http.get("/rpc").json()["endpoints"]
        assert len(busy["clients"]) == 1  # the llama-server's connection
    finally:
        client.terminate()
        client.wait(30)
    assert f"RPC0[{endpoint['endpoint']}] model buffer size" in log.read_text()
    assert daemon.instance("worker")["restarts"] == 0  # health checks while it served did not replace it

    # Killed, it is restarted by its policy and listed again.
    os.kill(worker["pid"], signal.SIGKILL)
    again = daemon.wait_for("worker", lambda i: i["restarts"] == 1 and i["state"] == "ready")
    assert again["pid"] != worker["pid"] and again["last_exit"] == "killed by SIGKILL"
    assert [e["endpoint"] for e in daemon.http.get("/rpc").json()["endpoints"]] == [endpoint["endpoint"]]


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return 0


# ---- doctor ------------------------------------------------------------------------------------------


def test_doctor_warns_about_rpc_ports_reachable_on_public_addresses(tmp_path: Path) -> None:
    settings = parse_settings("", tmp_path / "l.yaml")
    interfaces = ["127.0.0.1", "192.168.1.2", "203.0.113.7"]

    def warned(listening: list[str]) -> list[str]:
        return [f.message for f in rpc_exposure(settings, {50052: "w"}, {50052: listening}, interfaces)]

    assert warned(["0.0.0.0"]) == ["the rpc-server port 50052 (w) is reachable on the public address 203.0.113.7"]
    assert warned(["198.51.100.4"]) == ["the rpc-server port 50052 (w) is reachable on the public address 198.51.100.4"]
    assert warned(["192.168.1.2"]) == warned(["127.0.0.1"]) == warned([]) == []
    allowed = parse_settings("rpc: {listen: 0.0.0.0, allow_public: true}", tmp_path / "l.yaml")
    [finding] = rpc_exposure(allowed, {}, {}, interfaces)
    assert finding.level == "warn" and "rpc.listen 0.0.0.0 is not a loopback or private address" in finding.message


def test_doctor_fails_on_a_public_listen(write_config: ConfigWriter, marked_env: dict[str, str]) -> None:
    result = run_cli("--config", str(write_config(rpc={"listen": "203.0.113.7"})), "doctor", env=marked_env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "FAIL  config" in result.stdout and "rpc.listen: 203.0.113.7 is a public address" in result.stdout
