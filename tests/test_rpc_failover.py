"""An instance whose peer's rpc-server goes away: the verdict (keep, stop and wait degraded, start again)
as a function of the facts, and with real daemons: a killed ggml-rpc-server, then a stopped worker daemon,
each seen as `degraded` on the planning daemon and recovered from without the restart policy's budget."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from launcher.rpc.failover import Act, Verdict, judge, retry_delay_s
from launcher.schema_rpc import RpcClaim
from tests.conftest import ConfigWriter, Daemon, free_port, poll_until
from tests.test_rpc_peers import _peer, _worker_host

ME = "http://a:8400#split"
USED = [("b", "10.0.0.2:50052")]


def _attached(clients: list[str], read_s_ago: float = 0.1, **peer: Any) -> Any:
    """Peer b with its one endpoint, ``clients`` on it, read ``read_s_ago``."""
    seen = _peer("b", ("10.0.0.2:50052", 40))
    endpoint = seen.endpoints[0].model_copy(update={"clients": clients})
    return seen.model_copy(update={"endpoints": [endpoint], "read_s_ago": read_s_ago, **peer})


def test_a_running_instance_is_kept_while_its_endpoints_serve_it_and_stopped_when_one_goes_away() -> None:
    ours = ["10.0.0.1:41234"]
    assert judge(USED, [_attached(ours)], ME, ready_for_s=5.0) == Verdict(Act.KEEP)
    down = _attached(ours, reachable=False, error="connection refused")
    assert judge(USED, [down], ME, ready_for_s=5.0) == Verdict(Act.STOP, "peer b is not reachable (connection refused)")
    gone = _attached(ours).model_copy(update={"endpoints": []})
    assert judge(USED, [gone], ME, ready_for_s=5.0) == Verdict(
        Act.STOP, "peer b's rpc-server 10.0.0.2:50052 is gone (not in its GET /rpc)"
    )
    assert judge(USED, [], ME, ready_for_s=5.0).reason == "peer b is not reachable (not configured)"
    # Listed but with no connection from us: it restarted. Only a read taken since ready says so.
    restarted = Verdict(
        Act.STOP, "peer b's rpc-server 10.0.0.2:50052 lost this llama-server's connection (it restarted)"
    )
    assert judge(USED, [_attached([], read_s_ago=0.1)], ME, ready_for_s=5.0) == restarted
    assert judge(USED, [_attached([], read_s_ago=6.0)], ME, ready_for_s=5.0) == Verdict(Act.KEEP)


def test_a_degraded_instance_waits_until_every_endpoint_is_back_and_free_for_it() -> None:
    assert judge(USED, [_attached([])], ME, ready_for_s=None) == Verdict(Act.START)
    down = _attached([], reachable=False, error="timed out")
    assert judge(USED, [down], ME, ready_for_s=None) == Verdict(Act.WAIT, "peer b is not reachable (timed out)")
    # A server that ended is asked directly: the peer's last read may predate the kill.
    no_hello = judge(USED, [_attached([])], ME, ready_for_s=None, hello={"10.0.0.2:50052": False})
    assert no_hello == Verdict(Act.WAIT, "peer b's rpc-server 10.0.0.2:50052 does not answer HELLO")
    # Our own claim (still leased) is no obstacle; another holder's is.
    claimed = _attached([]).model_copy()
    claimed.endpoints[0].claims = [RpcClaim(holder=ME, gpu=0, memory_mib=9)]
    assert judge(USED, [claimed], ME, ready_for_s=None) == Verdict(Act.START)
    claimed.endpoints[0].claims = [RpcClaim(holder="http://z:8400#x", gpu=0, memory_mib=9)]
    assert judge(USED, [claimed], ME, ready_for_s=None) == Verdict(
        Act.WAIT, "peer b's rpc-server 10.0.0.2:50052 is claimed by http://z:8400#x"
    )


def test_starts_again_back_off_and_are_bounded() -> None:
    assert [retry_delay_s(n, 0.5, 3.0) for n in range(6)] == [0.0, 0.5, 1.0, 2.0, 3.0, 3.0]


# ---- real daemons -----------------------------------------------------------------------------------------


def _events(daemon: Daemon) -> list[dict[str, Any]]:
    text = daemon.http.get("/events", params={"recent": 500, "follow": "false"}).text
    return [json.loads(line.removeprefix("data: ")) for line in text.splitlines() if line.startswith("data: ")]


def _states(daemon: Daemon, name: str) -> list[dict[str, Any]]:
    return [e for e in _events(daemon) if e["instance"] == name and e["kind"] == "state"]


def _last_time(daemon: Daemon, name: str, state: str) -> datetime:
    return datetime.fromisoformat([e for e in _states(daemon, name) if e["state"] == state][-1]["time"])


def test_a_peer_or_its_rpc_server_going_away_degrades_the_instance_until_it_is_back(
    write_config: ConfigWriter,
    start_daemon: Callable[[Path], Daemon],
    tmp_path: Path,
) -> None:
    # A fixed port: the instance waits for the same endpoint, which a restarted daemon binds again.
    b_config = _worker_host(write_config, tmp_path, "b", port=free_port())
    b = start_daemon(b_config)
    worker = b.wait_for("worker", lambda i: i["state"] == "ready")
    peers = [{"url": b.url, "name": "b", "token_file": str(tmp_path / "b.token")}]
    a = start_daemon(
        write_config(
            {"split": {"hosts": "auto", "restart": {"backoff_initial": 0.2, "backoff_max": 1.0}}},
            peers=peers,
            rpc={"peer_interval_s": 0.3, "claim_ttl_s": 5},
            daemon={"state_dir": str(tmp_path / "a")},
        )
    )
    poll_until(lambda: a.http.get("/peers").json(), lambda p: p[0]["endpoints"], "b read", 10)
    assert a.http.post("/instances/split/start").status_code == 202
    ready = a.wait_for("split", lambda i: i["state"] == "ready")
    assert [d["host"] for d in ready["plan"]["devices"]] == ["b"]

    # b's rpc-server killed: b restarts it by policy; a sees its llama-server's connection gone.
    os.kill(worker["pid"], signal.SIGKILL)
    poll_until(lambda: _states(a, "split"), lambda s: any(e["state"] == "degraded" for e in s), "degraded", 30)
    again = a.wait_for("split", lambda i: i["state"] == "ready")
    assert again["restarts"] == 0  # not the restart policy's doing
    assert b.instance("worker")["restarts"] == 1
    answer = a.http.post(
        "/v1/chat/completions",
        json={"model": "split", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    assert answer.status_code == 200, answer.text

    # b's daemon stopped: degraded (its llama-server stopped) until it is back.
    b.stop()
    held = a.wait_for("split", lambda i: i["state"] == "degraded")
    assert held["pid"] is None and held["degraded_reason"].startswith("peer b is not reachable")
    shown = a.cli("status")
    assert "degraded" in shown.stdout and "split: degraded: peer b is not reachable" in shown.stdout, shown.stdout
    assert a.http.get("/instances/split").json()["state"] == "degraded"  # no restarts against a dead peer
    refused = a.http.post("/v1/completions", json={"model": "split", "prompt": "Hi", "max_tokens": 2})
    assert refused.status_code == 503 and "peer b is not reachable" in refused.json()["error"]["message"]
    b = start_daemon(b_config)
    b.wait_for("worker", lambda i: i["state"] == "ready")
    a.wait_for("split", lambda i: i["state"] == "ready")
    back_s = (_last_time(a, "split", "ready") - _last_time(b, "worker", "ready")).total_seconds()
    print(f"worker ready -> instance ready: {back_s:.2f}s")
    assert a.instance("split")["restarts"] == 0
    [claim] = [c for e in b.http.get("/rpc").json()["endpoints"] for c in e["claims"]]
    assert claim["holder"] == f"{a.url}#split"  # registered again with the restarted peer
