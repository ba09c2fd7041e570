"""The multi-host test with hosts that have addresses of their own: each worker daemon runs in a network
namespace made here (a veth pair to this one on a private /30), its API and ggml-rpc-server on that address,
and the planning daemon here reaches them over the veth pairs as it would other machines. Root only."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.netns import Namespace, namespace, unavailable
from tests.conftest import ConfigWriter, Daemon, poll_until
from tests.test_rpc_peers import TOKEN, _claims, _worker_host, split_model  # noqa: F401 (split_model: a fixture)


@pytest.fixture
def hosts() -> Iterator[tuple[Namespace, Namespace]]:
    """Two namespaces; requested before start_daemon, so torn down after it (and killing what is left
    inside first, were a daemon not stopped)."""
    why = unavailable()
    if why is not None:
        pytest.skip(why)
    with contextlib.ExitStack() as stack:
        try:
            made = stack.enter_context(namespace(0)), stack.enter_context(namespace(1))
        except subprocess.CalledProcessError as exc:  # root, but this machine's kernel or /run says no
            pytest.skip(f"cannot make a network namespace here: {' '.join(exc.cmd)}: {exc.stderr.strip()}")
        yield made


def test_a_model_split_over_two_namespaced_hosts_is_served_from_here_over_their_addresses(
    hosts: tuple[Namespace, Namespace],
    write_config: ConfigWriter,
    start_daemon: Callable[..., Daemon],
    split_model: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    workers = {}
    for name, ns in zip(("b", "c"), hosts, strict=True):
        worker = start_daemon(_worker_host(write_config, tmp_path, name, host=ns.inside), ns.run)
        worker.http.headers["Authorization"] = f"Bearer {TOKEN}"  # not on loopback: reads need the token too
        workers[name] = (ns, worker)
    endpoints = {
        n: f"{ns.inside}:{d.wait_for('worker', lambda i: i['state'] == 'ready')['port']}"
        for n, (ns, d) in workers.items()
    }
    peers = [{"url": d.url, "name": n, "token_file": str(tmp_path / f"{n}.token")} for n, (_, d) in workers.items()]
    a = start_daemon(
        write_config(
            {"split": {"model": str(split_model), "ctx": 512, "hosts": "auto"}},
            peers=peers,
            rpc={"peer_interval_s": 0.3, "claim_ttl_s": 5},
            daemon={"state_dir": str(tmp_path / "a")},
        )
    )
    poll_until(lambda: a.http.get("/peers").json(), lambda p: all(x["endpoints"] for x in p), "both peers read", 10)

    # No host holds it: one device on each namespaced peer, at its own address.
    plan = a.http.get("/plan/split").json()
    assert plan["fits"], plan["reason"]
    assert [(d["host"], d["endpoint"]) for d in plan["devices"]] == [("b", endpoints["b"]), ("c", endpoints["c"])]
    assert a.http.post("/instances/split/start").status_code == 202
    a.wait_for("split", lambda i: i["state"] == "ready")
    answer = a.http.post(
        "/v1/chat/completions",
        json={"model": "split", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4
    for (name, (ns, daemon)), device in zip(workers.items(), plan["devices"], strict=True):
        [held] = _claims(daemon)
        assert (held["holder"], held["memory_mib"]) == (f"{a.url}#split", device["total_mib"]), name
        # Its llama-server's connection comes from this side of the veth pair: it crossed a "network".
        [endpoint] = daemon.http.get("/rpc").json()["endpoints"]
        # (The set: llama-server may hold more than one connection to an rpc-server while it loads.)
        assert endpoint["clients"] and {c.rsplit(":", 1)[0] for c in endpoint["clients"]} == {ns.outside}, endpoint

    # Seen from inside the host (its own interfaces and sockets): the rpc-server is on no public address.
    for name, (_, daemon) in workers.items():
        doctor = daemon.cli("doctor", "--json")
        findings = json.loads(doctor.stdout)
        assert not [f for f in findings if f["check"] in ("rpc", "daemon") and f["level"] != "ok"], (name, findings)

    assert a.http.post("/instances/split/stop").status_code == 202
    assert all(_claims(d) == [] for _, d in workers.values())
