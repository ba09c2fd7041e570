"""The fleet front door: a model that runs on a peer is listed by this daemon's /v1/models and its requests
are forwarded to the peer's front door. The decision of where a name lives is a pure function, tested
exactly; then two real daemons, the peer serving through the llama-server stand-in."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from launcher.route.errors import RouteError
from launcher.route.where import Local, OnPeer, peer_models, where
from launcher.schema_front_door import ServedModel
from launcher.schema_rpc import PeerStatus
from tests.conftest import ConfigWriter, Daemon, free_port, poll_until, write_secret

StartDaemon = Callable[[Path], Daemon]
CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello"}]
LOCAL = {"here": "here", "h": "here"}  # a local model and its alias


def _peer(name: str, *models: str, reachable: bool = True) -> PeerStatus:
    """A peer whose front door lists ``models`` ("alias=model" for an alias)."""
    served = [ServedModel(id=m.partition("=")[0], state="ready", alias_of=m.partition("=")[2] or None) for m in models]
    error = None if reachable else "connection refused"
    return PeerStatus(name=name, url=f"http://{name}:8400", reachable=reachable, error=error, read_s_ago=0.1,
                      endpoints=[], models=served)  # fmt: skip


def test_local_names_win_then_the_first_reachable_peer_listing_it() -> None:
    peers = [_peer("b", "here", "big", "large=big", reachable=False), _peer("c", "big", "large=big"), _peer("d", "big")]
    assert where("h", LOCAL, peers) == Local("here")  # a local alias wins over a peer's model of that name
    assert where("big", LOCAL, peers) == OnPeer("c", "big")  # b lists it but does not answer
    assert where("large", LOCAL, peers) == OnPeer("c", "big")  # the peer's alias, resolved for the record
    assert where("big", LOCAL, peers[1:][::-1]) == OnPeer("d", "big")  # the configured order decides
    assert {n: p.name for n, (p, _m) in peer_models(LOCAL, peers).items()} == {"big": "c", "large": "c"}


def test_a_name_only_an_unreachable_peer_lists_is_503_an_unknown_one_404_listing_every_name() -> None:
    peers = [_peer("b", "gone", reachable=False), _peer("c", "big")]
    with pytest.raises(RouteError) as down:
        where("gone", LOCAL, peers)
    assert (down.value.status, down.value.code, down.value.retry_after_s) == (503, "peer_unreachable", 5)
    assert down.value.message == "gone is served by peer b, which is not reachable (connection refused)"
    with pytest.raises(RouteError) as unknown:
        where("nope", LOCAL, peers)
    assert unknown.value.status == 404
    assert unknown.value.message == "no model named 'nope'; known: big, h, here"  # not the unreachable one's
    with pytest.raises(RouteError) as none:
        where("nope", {}, [])
    assert none.value.message == "no model named 'nope'; known: none"


def test_a_peers_model_is_listed_and_served_through_this_front_door(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path, tmp_path: Path
) -> None:
    # The peer: its own state directory and port, a key-protected front door (its token is one of the keys).
    write_secret(tmp_path / "b.token", "peer-token")
    b_dir = tmp_path / "b"
    b_dir.mkdir()
    served = {"binary": str(standin), "autostart": True}
    b_config = write_config(
        {"remote": {**served, "aliases": ["far"]}, "shared": served, "idle": {"binary": str(standin)}},
        daemon={"state_dir": str(b_dir / "state"), "token_file": str(tmp_path / "b.token")},
        router={"api_keys": ["b-user-key"]},
    )
    b_config = b_config.rename(b_dir / "launcher.yaml")
    b = start_daemon(b_config)
    for name in ("remote", "shared"):
        b.wait_for(name, lambda s: s["state"] == "ready")
    a = start_daemon(
        write_config(
            {"shared": served},
            daemon={"port": free_port()},
            peers=[{"url": b.url, "name": "b", "token_file": str(tmp_path / "b.token")}],
            rpc={"peer_interval_s": 0.3},
        )
    )
    a.wait_for("shared", lambda s: s["state"] == "ready")
    client = openai.OpenAI(base_url=f"{a.url}/v1", api_key="unused", max_retries=0)

    models = poll_until(lambda: {m.id: m for m in client.models.list()}, lambda m: "remote" in m, "b's models", 10)
    assert set(models) == {"shared", "remote", "far", "idle"}  # b's `shared` is shadowed: the local one wins
    listed = {name: (m.owned_by, m.model_extra) for name, m in models.items()}
    assert listed["remote"] == ("peer:b", {"state": "ready", "aliases": ["far"], "peer": "b", "reachable": True})
    assert listed["far"][1] == {"state": "ready", "alias_of": "remote", "peer": "b", "reachable": True}
    assert listed["shared"][0] == "launcher"

    plain = client.chat.completions.create(model="far", messages=CHAT)
    assert plain.model == "far" and plain.usage is not None and plain.usage.completion_tokens == 2
    chunks = list(client.chat.completions.create(model="remote", messages=CHAT, stream=True))
    assert next(c.choices[0].delta.content for c in chunks if c.choices) == "one"  # the stand-in's first event
    client.chat.completions.create(model="shared", messages=CHAT)
    records = {(r["model"], r["instance"], r["streamed"], r["status"]) for r in a.http.get("/requests").json()}
    assert records == {
        ("remote", "peer:b", False, 200),
        ("remote", "peer:b", True, 200),
        ("shared", "shared", False, 200),
    }
    # The peer's own errors name it; /upstream goes there too.
    assert a.http.get("/upstream/remote/stats").json()["requests"] == 2
    idle = a.http.post("/v1/chat/completions", json={"model": "idle", "messages": CHAT})
    assert idle.status_code == 503 and idle.json()["error"]["message"].startswith("peer b: idle is not running")
    status = a.cli("status")
    assert status.returncode == 0 and "REMOTE MODEL" in status.stdout
    assert any(line.split()[:3] == ["remote", "b", "ready"] for line in status.stdout.splitlines())

    # The peer gone: 503 naming it, at once (its connection refused) and once the reader has seen it.
    b.stop()
    for _ in range(2):
        with pytest.raises(openai.APIStatusError) as gone:
            client.chat.completions.create(model="remote", messages=CHAT)
        assert (
            gone.value.status_code == 503 and "peer b" in gone.value.message and "not reachable" in gone.value.message
        )
        poll_until(lambda: a.http.get("/peers").json()[0]["reachable"], lambda r: not r, "b seen down", 10)
    assert 'launcher_peer_up{peer="b"} 0.0' in a.http.get("/metrics").text  # what LauncherPeerUnreachable reads
