"""HTTP limits before any authentication, against a real daemon with raw sockets as the hostile clients:
a bounded head, a deadline on each head and body (408), the daemon-wide budget for bodies (503 with
Retry-After, memory given back), a bound on JSON depth (400, recorded), and acts that wait for their
whole request. Every client is on loopback, few, and bounded in time."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import psutil
import pytest

from launcher.route import naming, proxy, request_log, usage
from launcher.route.front import FrontDoor, parse_json_body
from launcher.route.served import Served
from launcher.route.where import Local
from tests.conftest import ConfigWriter, Daemon, poll_until

TIMEOUT_S = 1.0  # daemon.request_timeout_s in these tests
MIB = 2**20
HEAD = b"Host: 127.0.0.1\r\n"
JSON = {"content-type": "application/json"}  # what every OpenAI client sends, and /v1 requires


def connect(daemon: Daemon) -> socket.socket:
    host, _, port = daemon.url.removeprefix("http://").rpartition(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the daemon sends until it closes the connection (bounded by the socket's timeout)."""
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def status_and_body(answer: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body else {}


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One answer's status, headers and (when it has a Content-Length) body, off a connection left open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split(" ", 2)[1]), headers, body


def send_until_cut(sock: socket.socket, limit_b: int) -> int:
    """The bytes sent before the daemon cut the connection (``limit_b`` if it never did)."""
    piece = b"a" * (256 * 1024)
    sent_b = 0
    try:
        while sent_b < limit_b:
            sock.sendall(piece)
            sent_b += len(piece)
    except (BrokenPipeError, ConnectionResetError):
        return sent_b
    return limit_b


def answers_health(daemon: Daemon) -> None:
    assert daemon.http.get("/health", timeout=5).status_code == 200


@pytest.fixture
def daemon(write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon]) -> Iterator[Daemon]:
    config = write_config(daemon={"request_timeout_s": TIMEOUT_S, "body_budget_mib": 64})
    d = start_daemon(config)
    yield d
    answers_health(d)  # after every hostile client, the daemon still answers


def test_a_head_over_64_kib_is_refused_with_431_and_closed(daemon: Daemon) -> None:
    with connect(daemon) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n" + HEAD + b"X-Big: " + b"a" * (65 * 1024))
        status, body = status_and_body(read_until_closed(sock))
    assert status == 431
    assert body == {"detail": "the request line and headers are over 64 KiB"}


def test_what_is_not_http_is_400_in_json(daemon: Daemon) -> None:
    with connect(daemon) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nNo colon here\r\n\r\n")
        status, body = status_and_body(read_until_closed(sock))
    assert (status, body) == (400, {"detail": "the request is not valid HTTP/1.1"})


def test_a_huge_unfinished_header_is_cut_off_and_not_held(daemon: Daemon) -> None:
    proc = psutil.Process(daemon.proc.pid)
    before_mib = proc.memory_info().rss / MIB
    with connect(daemon) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n" + HEAD + b"X-Big: ")
        sent_b = send_until_cut(sock, 64 * MIB)
    assert sent_b < 32 * MIB  # the socket buffers on the way hold a few MiB
    assert proc.memory_info().rss / MIB < before_mib + 16


@pytest.mark.parametrize(
    "start",
    [
        pytest.param(b"", id="nothing-sent"),
        pytest.param(b"GET /health HTTP/1.1\r\n" + HEAD + b"X-Half: ", id="half-a-head"),
        pytest.param(
            b"POST /v1/chat/completions HTTP/1.1\r\n" + HEAD + b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"mod\r\n',
            id="unfinished-chunked-body",
        ),
        pytest.param(
            b"POST /v1/chat/completions HTTP/1.1\r\n" + HEAD + b'Content-Length: 100\r\n\r\n{"model"',
            id="short-content-length",
        ),
    ],
)
def test_a_slow_request_is_closed_with_408_within_the_timeout(daemon: Daemon, start: bytes) -> None:
    with connect(daemon) as sock:
        sock.sendall(start)
        begin = time.monotonic()
        answers_health(daemon)  # others are served meanwhile
        answer = read_until_closed(sock)
        took_s = time.monotonic() - begin
    status, body = status_and_body(answer)
    assert status == 408
    assert TIMEOUT_S * 0.9 <= took_s < TIMEOUT_S + 2.0
    if start.startswith(b"POST /v1/"):  # the body's path is known: the front door's shape
        assert body["error"]["code"] == "request_timeout"
        assert "body did not arrive within 1 s" in body["error"]["message"]
    else:
        assert "did not arrive within 1 s" in body["detail"]


def test_blank_lines_between_requests_do_not_hold_the_connection(daemon: Daemon) -> None:
    """HTTP lets a client send CRLFs before a request line; they start no request, and must not keep the
    connection open past the deadline of the head they stand for."""
    with connect(daemon) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n" + HEAD + b"\r\n")
        assert read_answer(sock)[0] == 200
        begin = time.monotonic()
        sock.settimeout(TIMEOUT_S / 4)
        answer = b""
        for _ in range(int(8 / (TIMEOUT_S / 4))):  # bounded: 8 s of blank lines at most
            try:
                sock.sendall(b"\r\n")
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if not chunk:
                break
            answer += chunk
        took_s = time.monotonic() - begin
    assert status_and_body(answer)[0] == 408
    assert took_s < TIMEOUT_S + 2.0


def test_a_stop_whose_body_never_arrives_stops_nothing(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon], standin: Path
) -> None:
    model = {"tiny": {"autostart": True, "binary": str(standin)}}  # a server's stand-in: the act is what counts
    config = write_config(model, daemon={"request_timeout_s": TIMEOUT_S})
    daemon = start_daemon(config)
    pid = daemon.wait_for("tiny", lambda i: i["state"] == "ready")["pid"]
    with connect(daemon) as sock:
        sock.sendall(b"POST /instances/tiny/stop HTTP/1.1\r\n" + HEAD + b"Content-Length: 100\r\n\r\n{}")
        status, _ = status_and_body(read_until_closed(sock))
    assert status == 408
    assert (daemon.instance("tiny")["state"], daemon.instance("tiny")["pid"]) == ("ready", pid)
    answers_health(daemon)
    # The same act with its whole body acts: the wait above was for the body, not a refusal.
    assert daemon.http.post("/instances/tiny/stop", content=b"{}").status_code == 202
    daemon.wait_for("tiny", lambda i: i["state"] == "stopped")


def test_bodies_beyond_the_budget_get_503_and_their_memory_comes_back(daemon: Daemon) -> None:
    proc = psutil.Process(daemon.proc.pid)
    daemon.http.post("/v1/chat/completions", content=b'{"model": "none", "pad": "' + b"a" * MIB + b'"}', headers=JSON)
    before_mib = proc.memory_info().rss / MIB
    body = b'{"model": "none", "pad": "' + b"a" * (48 * MIB) + b'"}'
    head = b"POST /v1/chat/completions HTTP/1.1\r\n" + HEAD + b"Content-Type: application/json\r\n"
    head += b"Content-Length: %d\r\n\r\n" % len(body)
    with connect(daemon) as first, connect(daemon) as second:
        first.sendall(head + body[: 40 * MIB])  # 40 MiB of the 64 MiB budget held
        poll_until(lambda: proc.memory_info().rss / MIB, lambda mib: mib > before_mib + 30, "the held body", 10)
        second.sendall(head + body)  # past 24 MiB of it, refused; the rest is read and dropped
        status, headers, refusal = read_answer(second)
        assert status == 503
        assert headers["retry-after"] == "2"
        error = json.loads(refusal)["error"]
        assert (error["type"], error["code"]) == ("unavailable_error", "body_budget_exceeded")
        assert "daemon.body_budget_mib 64" in error["message"]
        first.sendall(body[40 * MIB :])
        status, _, _ = read_answer(first)
        assert status == 404  # the whole body was taken: the model it names is unknown
    poll_until(lambda: proc.memory_info().rss / MIB, lambda mib: mib < before_mib + 8, "RSS after the bodies", 10)


TOO_LARGE = {"type": "invalid_request_error", "param": None, "code": "body_too_large"}


@pytest.mark.parametrize(
    ("path", "max_mib", "detail"),
    [
        ("/v1/chat/completions", 64, {"error": {**TOO_LARGE, "message": "the body is over 64 MiB"}}),
        ("/rpc/claims", 1, {"detail": "the body is over 1 MiB"}),  # the API's only body is a claim
    ],
)
def test_a_body_declared_over_its_bound_is_413_before_any_of_it_is_read(
    daemon: Daemon, path: str, max_mib: int, detail: dict[str, Any]
) -> None:
    with connect(daemon) as sock:
        head = b"POST %s HTTP/1.1\r\n" % path.encode() + HEAD + b"Content-Type: application/json\r\n"
        sock.sendall(head + b"Content-Length: %d\r\n\r\n" % (max_mib * MIB + 1))
        status, _, body = read_answer(sock)
    assert status == 413
    assert json.loads(body) == detail


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [65, 1000, 100_000])
def test_json_nested_too_deep_is_400_in_openai_shape_and_recorded(daemon: Daemon, depth: int) -> None:
    body = '{"model": "none", "messages": ' + nested(depth - 1) + "}"
    answer = daemon.http.post("/v1/chat/completions", content=body, headers=JSON)
    assert answer.status_code == 400
    assert answer.json() == {
        "error": {
            "message": "the JSON body nests deeper than 64 levels",
            "type": "invalid_request_error",
            "param": None,
            "code": "json_too_deep",
        }
    }
    records = daemon.http.get("/requests").json()
    assert [(r["path"], r["status"]) for r in records] == [("/v1/chat/completions", 400)]


def test_json_64_levels_deep_is_parsed(daemon: Daemon) -> None:
    body = '{"model": "none", "messages": ' + nested(63) + "}"
    answer = daemon.http.post("/v1/chat/completions", content=body, headers=JSON)
    assert answer.status_code == 404  # past the parse: no model is called "none"


@pytest.mark.parametrize("depth", [65, 100_000])
def test_json_nested_too_deep_is_400_on_the_api(daemon: Daemon, depth: int) -> None:
    answer = daemon.http.post("/rpc/claims", content=nested(depth), headers=JSON)
    assert answer.status_code == 400
    assert answer.json() == {"detail": "the JSON body nests deeper than 64 levels"}


async def test_a_large_json_body_parses_off_the_event_loop() -> None:
    """Tens of MiB of JSON take seconds to parse: on the event loop they would hold every other request up
    (a hostile client's 40 MiB body stalled the daemon for 3 to 9 s). Here, another task runs while a
    large body parses; a small one parses at once, with no thread's hand-off."""
    order: list[str] = []

    async def other() -> None:
        order.append("other")

    for body, expected in (
        (json.dumps({"model": "m", "prompt": "x" * 2 * MIB}).encode(), ["other", "parsed"]),
        (b'{"model": "m", "prompt": "x"}', ["parsed", "other"]),
    ):
        order.clear()
        task = asyncio.create_task(other())
        doc = await parse_json_body(body)
        order.append("parsed")
        await task
        assert doc["model"] == "m" and order == expected


class _RenamingRouter:
    """What the front door asks of its router for one local request, noting whether the body was written
    again (an Ollama model's name put in it) on the event loop's thread."""

    def __init__(self) -> None:
        self.rewritten_on_loop: list[bool] = []
        self.request_log = self
        self.to_peers = self

    def place(self, name: str) -> Local:
        return Local(name)

    def body_for(self, model: str, doc: dict[str, Any], body: bytes) -> bytes:
        self.rewritten_on_loop.append(threading.current_thread() is threading.main_thread())
        return body

    async def serve(self, *_args: Any, **_kwargs: Any) -> Served:
        return Served(status=200, instance="m")

    async def record(self, *_args: Any) -> None:
        return None


async def _post_through(door: FrontDoor, body: bytes) -> list[Any]:
    """POST ``body`` to the door's /v1/completions from a client that stays till the end; what it was sent."""
    messages = iter([{"type": "http.request", "body": body}])
    sent: list[Any] = []

    async def receive() -> Any:
        return next(messages, None) or await asyncio.Event().wait()

    async def send(message: Any) -> None:
        sent.append(message)

    headers = [(k.encode(), v.encode()) for k, v in JSON.items()]
    await door({"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers}, receive, send)
    return sent


async def test_a_large_body_is_written_again_for_its_server_off_the_event_loop() -> None:
    """An Ollama model's body is written again with Ollama's name of the model: 30 MiB took 0.2 s to write,
    which on the event loop held every other request and stream up, as a parse would."""
    router = _RenamingRouter()
    door = FrontDoor(cast(Any, None), cast(Any, router), None)
    for prompt in ("x" * 2 * MIB, "x"):
        sent = await _post_through(door, json.dumps({"model": "m", "prompt": prompt}).encode())
        assert sent == []  # the stand-in's serve answered nothing: no error from the door
    assert router.rewritten_on_loop == [False, True]  # the large one in a thread, the small one at once


def _noting_thread(work: Callable[..., Any], on_loop: list[bool]) -> Callable[..., Any]:
    def noted(*args: Any) -> Any:
        on_loop.append(threading.current_thread() is threading.main_thread())
        return work(*args)

    return noted


async def _relayed(doc: dict[str, Any]) -> tuple[bytes, proxy.Answer]:
    """A plain JSON answer ``doc`` relayed with its `model` named "e": what the client got, and the answer."""
    sent: list[Any] = []

    async def body() -> AsyncIterator[bytes]:
        yield json.dumps(doc).encode()

    async def send(message: Any) -> None:
        sent.append(message)

    headers = [(b"content-type", b"application/json")]
    answer = await proxy.relay(200, headers, body(), send, 0.0, broke_off=(OSError,), naming="e")
    return b"".join(m.get("body", b"") for m in sent), answer


async def test_a_large_plain_answer_is_renamed_and_read_for_its_tokens_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A plain answer is parsed twice after it came: to rename its `model` and to read its token counts. A
    4 MiB answer of embeddings took 0.28 s and 0.33 s to parse, each on the event loop, holding every
    other request and stream up; a large one is parsed in a thread, a small one at once."""
    renamed_on_loop: list[bool] = []
    read_on_loop: list[bool] = []
    monkeypatch.setattr(proxy, "rename_document", _noting_thread(naming.rename_document, renamed_on_loop))
    monkeypatch.setattr(request_log, "of_body", _noting_thread(usage.of_body, read_on_loop))
    log = request_log.RequestLog(lambda: iter(()))
    for floats in (20_000, 1):
        doc = {"model": "/m/x.gguf", "data": [{"embedding": [0.5] * floats}], "usage": {"prompt_tokens": 3}}
        got, answer = await _relayed(doc)
        assert json.loads(got)["model"] == "e"
        await log.record("e", "POST", "/v1/embeddings", "now", Served(200, "e", answer), 0.1)
        assert log.records[-1].prompt_tokens == 3
    assert renamed_on_loop == read_on_loop == [False, True]  # the large one in a thread, the small one at once
