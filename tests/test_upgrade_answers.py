"""The API's answers across an upgrade in place: an open event stream ends cleanly (the end of its chunked
body) and an ordinary request under way is answered whole (before: the API was ended 0.1 s after the front
door went quiet, and both were cut mid-answer); an upgrade asked for while a restart or a reload is under way
is refused, since the exec would cut it part-way; a reload's keys survive an exec that failed."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from launcher import upgrade
from tests.conftest import READY_TIMEOUT_S, ConfigWriter, Daemon, poll_until
from tests.test_drain import completed, serving, the_rest
from tests.test_front_door import first_event, held
from tests.test_upgrade import program_start, program_started_at, upgraded

StartDaemon = Callable[[Path], Daemon]


def _http_answer(sock: socket.socket, *, until_closed: bool = False) -> tuple[bytes, bytes]:
    """The head and body of the next answer on ``sock`` (its Content-Length's worth); ``until_closed``: the
    body is all the daemon writes until it closes the connection."""
    sock.settimeout(30)
    received = b""
    while b"\r\n\r\n" not in received and (chunk := sock.recv(65536)):
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lengths = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
    while (until_closed or len(body) < sum(lengths)) and (chunk := sock.recv(65536)):
        body += chunk
    assert len(lengths) == 1 and len(body) == lengths[0], received
    return head, body


def test_an_event_stream_and_a_request_under_way_end_cleanly_across_an_upgrade(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    daemon = serving(write_config, start_daemon, standin)
    pid = daemon.instance("m")["pid"]
    before = program_start(daemon)
    port = int(daemon.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as slow:
        # A request the old program accepted (it answered one on this connection), whose body comes late.
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert _http_answer(slow)[0].startswith(b"HTTP/1.1 200")
        body = b'{"holder": "x"}'
        slow.sendall(
            b"POST /rpc/claims HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        with daemon.http.stream("GET", "/events", params={"follow": "true"}, timeout=30) as events:
            assert events.status_code == 200
            answer = httpx.post(f"{daemon.url}/daemon/upgrade", timeout=10)
            assert answer.status_code == 202, answer.text
            # The whole body, up to the end of its chunked encoding: a cut one raises RemoteProtocolError.
            streamed = b"".join(events.iter_bytes())
        assert streamed.endswith(b"\n\n") or streamed == b""
        slow.sendall(body)  # the API is ending now: the request under way is still answered
        head, content = _http_answer(slow, until_closed=True)  # whole, then the connection closes
    assert head.startswith(b"HTTP/1.1 422") and b"detail" in content, head
    upgraded(daemon, before)
    assert daemon.instance("m")["pid"] == pid


def test_an_upgrade_waits_for_no_reload_restart_or_roll_it_would_cut() -> None:
    facts = {"foreground": False, "serving": True, "stopping": False, "upgrading": False, "reloading": False}
    facts["bridge_ending"] = False
    assert upgrade.refusal(**facts, restarting=[]) == upgrade.cannot_reexec()
    bridge = upgrade.refusal(**{**facts, "bridge_ending": True}, restarting=[])  # the exec would orphan it
    assert bridge is not None and "the last upgrade's bridge is still finishing" in bridge
    reloading = upgrade.refusal(**{**facts, "reloading": True}, restarting=[])
    assert reloading is not None and "reload" in reloading
    restarting = upgrade.refusal(**facts, restarting=["a", "b"])
    assert restarting is not None and "restart of a, b" in restarting
    stopping = upgrade.refusal(**{**facts, "stopping": True, "reloading": True}, restarting=["a"])
    assert stopping == "the daemon is stopping"  # the first reason is the one that lasts


def test_an_upgrade_during_a_restart_is_refused_then_done_once_it_ended(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    """The restart drains a request in flight: the exec would cut the restart part-way."""
    daemon = serving(write_config, start_daemon, standin, drain_timeout_s=20)
    before = program_start(daemon)
    port = daemon.instance("m")["port"]
    with (
        ThreadPoolExecutor(1) as pool,
        daemon.http.stream("POST", "/v1/chat/completions", json=held("m")) as stream,
    ):
        lines = stream.iter_lines()
        first_event(lines)
        restart = pool.submit(httpx.post, f"{daemon.url}/instances/m/restart", timeout=READY_TIMEOUT_S)
        poll_until(lambda: daemon.instance("m")["state"], lambda s: s == "draining", "the restart's drain", 10)

        refused = httpx.post(f"{daemon.url}/daemon/upgrade", timeout=10)

        assert httpx.post(f"http://127.0.0.1:{port}/release", json={}, timeout=10).status_code == 200
        assert completed(the_rest(lines))
        assert restart.result().status_code == 202
    assert refused.status_code == 409, refused.text
    assert "a restart of m is under way" in refused.json()["detail"]
    assert program_started_at(daemon) == before
    daemon.wait_for("m", lambda s: s["state"] == "ready")
    assert httpx.post(f"{daemon.url}/daemon/upgrade", timeout=10).status_code == 202
    upgraded(daemon, before)


def test_a_reloads_keys_hold_after_an_upgrade_that_failed(
    write_config: ConfigWriter, start_daemon: StartDaemon, tmp_path: Path, standin: Path
) -> None:
    """The front door of the API served again after a failed exec takes the keys of the last reload (before:
    the keys the daemon started with, and each failed exec added another listener to the reloader)."""
    config = write_config({"m": {"binary": str(standin), "autostart": True}}, router={"api_keys": ["old-key-1234"]})
    daemon = start_daemon(config)
    daemon.wait_for("m", lambda s: s["state"] == "ready")
    config.write_text(config.read_text().replace("old-key-1234", "new-key-5678"))
    assert httpx.post(f"{daemon.url}/config/reload", timeout=30).status_code == 200
    (tmp_path / "state" / "handover.json").mkdir()  # the record cannot replace a directory: the exec fails

    assert httpx.post(f"{daemon.url}/daemon/upgrade", timeout=10).status_code == 202
    poll_until(lambda: "serving on with the running program" in "".join(daemon.log), bool, "the failure", 30)

    def models(key: str) -> int:
        headers = {"Authorization": f"Bearer {key}"}
        return httpx.get(f"{daemon.url}/v1/models", headers=headers, timeout=10).status_code

    assert poll_until(lambda: models("new-key-5678"), lambda s: s == 200, "the API again", 10) == 200
    assert models("old-key-1234") == 401
    assert httpx.post(f"{daemon.url}/config/reload", timeout=30).status_code == 200  # refused only meanwhile


@contextlib.contextmanager
def upgrade_draining(daemon: Daemon) -> Iterator[httpx.Client]:
    """An upgrade asked on a connection kept alive, whose drain a request to model m held through the front
    door keeps going until the block ends (the request then finishes): yields that connection, which the
    old program still serves."""
    port = daemon.instance("m")["port"]
    with (
        httpx.Client(base_url=daemon.url, timeout=10) as kept,
        daemon.http.stream("POST", "/v1/chat/completions", json=held("m")) as stream,
    ):
        lines = stream.iter_lines()
        first_event(lines)
        assert kept.post("/daemon/upgrade").status_code == 202  # waits for the stream to finish
        yield kept
        assert httpx.post(f"http://127.0.0.1:{port}/release", json={}, timeout=10).status_code == 200
        assert completed(the_rest(lines))


def test_a_reload_asked_while_an_upgrade_drains_is_refused(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    """The exec would cut a reload part-way: asked on a connection the old program still serves (or by
    SIGHUP) while the upgrade waits for a request in flight, it is refused with the reason."""
    daemon = serving(write_config, start_daemon, standin, drain_timeout_s=20)
    before = program_start(daemon)
    with upgrade_draining(daemon) as kept:
        refused = kept.post("/config/reload")
    assert refused.status_code == 409, refused.text
    assert "an upgrade is under way" in refused.json()["detail"]
    upgraded(daemon, before)
    assert httpx.post(f"{daemon.url}/config/reload", timeout=30).status_code == 200  # the new program takes them
