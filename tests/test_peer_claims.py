"""The claims this daemon's instances hold on a peer's rpc-servers, against a stand-in peer that records
what it is asked in the order it is asked: a renewal that releases a stopped instance's claim never
releases the claim of an instance that started while the renewal ran."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import pytest

from launcher.config import Settings
from launcher.events import Bus
from launcher.rpc.peers import Peers
from launcher.schema_instances import Event
from launcher.schema_plans import DevicePlan, HostPlan, Plan

_ENDPOINT = "10.0.0.2:50052"


class _StandInPeer(ThreadingHTTPServer):
    """Answers claims (POST) and releases (DELETE) of `/rpc/claims`, recording each as it completes; the
    release of ``slow_holder`` waits for ``go_on`` (a release on its way over a slow network)."""

    def __init__(self, slow_holder: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.slow_holder = slow_holder
        self.slow_release_began = threading.Event()
        self.go_on = threading.Event()
        self.asked: list[tuple[str, str, list[int]]] = []  # (what, holder, MiB per device)
        self.changed = threading.Condition()

    def record(self, what: str, holder: str, mib: list[int]) -> None:
        with self.changed:
            self.asked.append((what, holder, mib))
            self.changed.notify_all()

    def wait_for(self, count: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.asked) >= count, timeout=10), self.asked


class _Handler(BaseHTTPRequestHandler):
    server: _StandInPeer

    def log_message(self, *_args: object) -> None:
        pass

    def _answer(self, status: int, body: bytes = b"") -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # the peer's /rpc and /v1/models: not what this test is about
        self._answer(503, b'{"error": "a stand-in", "hint": null}')

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.record("claim", request["holder"], [d["memory_mib"] for d in request["devices"]])
        self._answer(200, b"[]")

    def do_DELETE(self) -> None:
        holder = unquote(self.path.rsplit("/", 1)[1])
        if holder == self.server.slow_holder:
            self.server.slow_release_began.set()
            self.server.go_on.wait(10)
        self.server.record("release", holder, [])
        self._answer(204)


@pytest.fixture
def peer() -> Iterator[_StandInPeer]:
    server = _StandInPeer(slow_holder="http://127.0.0.1:1#a")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.go_on.set()
    server.shutdown()
    thread.join()
    server.server_close()


def _plan_on_peer(memory_mib: int) -> Plan:
    device = DevicePlan(
        gpu=0, uuid="GPU-0", name="peer GPU", layers=4, output_layer=True, weights_mib=memory_mib, kv_cache_mib=0,
        compute_mib=0, overhead_mib=0, total_mib=memory_mib, usable_mib=24000, free_after_mib=0,
        host="gpubox", endpoint=_ENDPOINT,
    )  # fmt: skip
    empty = HostPlan(weights_mib=0, kv_cache_mib=0, compute_mib=0)
    return Plan(
        model="m.gguf", backend="llama-server", fits=True, reason=None, suggestions=[], ctx=512, flash_attn=False,
        cache_type_k="f16", cache_type_v="f16", gpu_layers=4, devices=[device], host=empty, tensor_split=[],
    )  # fmt: skip


async def test_a_renewal_does_not_release_the_claim_of_an_instance_that_started_meanwhile(peer: _StandInPeer) -> None:
    settings = Settings.model_validate(
        {
            "daemon": {"port": 1},  # the holder names this daemon by its URL: http://127.0.0.1:1#INSTANCE
            "rpc": {"peer_interval_s": 0.05},
            "peers": [{"name": "gpubox", "url": f"http://127.0.0.1:{peer.server_address[1]}"}],
        }
    )
    running: set[str] = set()
    peers = Peers(settings, events=Bus[Event](10), active=lambda: running)
    await peers.claim("a", _plan_on_peer(10))
    await peers.claim("x", _plan_on_peer(20))  # x held a claim, then stopped: neither runs now
    await peers.start()
    try:
        # The next renewal releases a's claim (a stopped); that release is slow to reach the peer.
        await asyncio.to_thread(peer.slow_release_began.wait, 10)
        await peers.claim("x", _plan_on_peer(30))  # meanwhile x starts again with a new plan
        running.add("x")
        asked = len(peer.asked)
        peer.go_on.set()
        await asyncio.to_thread(peer.wait_for, asked + 2)  # a's release, then the renewal's word about x
        x_after = [(what, mib) for what, holder, mib in peer.asked[asked:] if holder.endswith("#x")]
        assert x_after[0] == ("claim", [30]), peer.asked  # renewed, not released
    finally:
        await peers.stop()
    assert ("release", "http://127.0.0.1:1#x", []) in peer.asked[asked + 2 :]  # stopping lets go of x's claim


async def test_a_reload_that_removes_a_peer_drops_the_claims_held_on_it(peer: _StandInPeer) -> None:
    """Dropped, not released: the peer is no longer one to ask (its claims lapse by their lease); the peer
    is no longer read or listed, and one added is."""
    url = f"http://127.0.0.1:{peer.server_address[1]}"
    settings = Settings.model_validate({"daemon": {"port": 1}, "peers": [{"name": "gpubox", "url": url}]})
    events = Bus[Event](10)
    queue = events.subscribe()
    peers = Peers(settings, events=events, active=lambda: {"a"})
    await peers.claim("a", _plan_on_peer(10))
    asked = len(peer.asked)

    peers.reconfigure(settings.rpc, [])
    dropped = await asyncio.wait_for(queue.get(), 5)
    assert dropped.message == f"peer gpubox was removed from the configuration: its claim on {_ENDPOINT} is dropped"
    assert dropped.instance == "a"
    await peers.release("a")  # a stops: nothing is held, so the removed peer is not asked
    assert peers.statuses() == [] and len(peer.asked) == asked

    added = Settings.model_validate({"daemon": {"port": 1}, "peers": [{"name": "other", "url": url}]})
    peers.reconfigure(added.rpc, added.peers)
    [status] = peers.statuses()
    assert (status.name, status.reachable, status.error) == ("other", False, "not read yet")
