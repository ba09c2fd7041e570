"""The front door's upstream seam: which of the client's headers go on to a server (`outgoing_headers`),
how a server's answer comes back (`relay`), and the aiohttp `Upstream` behind the `UpstreamClient`
interface, against a real server on loopback."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from launcher.route.proxy import Answer, Upstream, UpstreamClient, UpstreamFailed, outgoing_headers, relay

Headers = list[tuple[bytes, bytes]]


def names(headers: list[tuple[str, str]]) -> list[str]:
    return [k for k, _ in headers]


# ---- outgoing_headers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [b"Connection", b"Keep-Alive", b"Proxy-Connection", b"TE", b"Trailer", b"Transfer-Encoding", b"Upgrade"],
)
def test_a_hop_by_hop_header_is_not_forwarded(name: bytes) -> None:
    """RFC 9110 7.6.1: these are about the client's connection to the door, not the message."""
    headers = [(b"accept", b"*/*"), (name, b"x"), (b"x-request-id", b"7")]
    assert outgoing_headers(headers, ()) == [("accept", "*/*"), ("x-request-id", "7")]


def test_end_to_end_headers_pass_in_order_with_their_names_and_values_as_sent() -> None:
    headers = [
        (b"Content-Type", b"application/json"),
        (b"Accept", b"text/event-stream"),
        (b"X-Note", b"caf\xe9"),  # latin-1, as HTTP/1.1 carries it
        (b"Accept", b"application/json"),
        (b"sec-ch-ua", b'"Chromium"'),  # a client hint, not fetch metadata
    ]
    assert outgoing_headers(headers, ()) == [
        ("Content-Type", "application/json"),
        ("Accept", "text/event-stream"),
        ("X-Note", "caf\xe9"),
        ("Accept", "application/json"),
        ("sec-ch-ua", '"Chromium"'),
    ]


def test_headers_the_clients_connection_header_names_are_not_forwarded() -> None:
    """Any case, comma lists with spaces and tabs, and more than one Connection header."""
    headers = [
        (b"connection", b"keep-alive, X-Trace ,\tX-Hop"),
        (b"CONNECTION", b"x-second"),
        (b"x-trace", b"1"),
        (b"X-HOP", b"2"),
        (b"X-Second", b"3"),
        (b"x-tracer", b"4"),  # only a prefix of a named one
        (b"x-kept", b"5"),
    ]
    assert outgoing_headers(headers, ()) == [("x-tracer", "4"), ("x-kept", "5")]


def test_an_empty_name_in_connection_drops_nothing_else() -> None:
    headers = [(b"connection", b"close,, "), (b"accept", b"*/*")]
    assert outgoing_headers(headers, ()) == [("accept", "*/*")]


@pytest.mark.parametrize("name", [b"Authorization", b"X-Api-Key", b"Proxy-Authorization"])
def test_the_clients_key_for_the_door_is_not_the_servers(name: bytes) -> None:
    headers = [(name, b"Bearer sk-client"), (b"accept", b"*/*")]
    assert outgoing_headers(headers, ()) == [("accept", "*/*")]


def test_extra_headers_follow_the_clients_and_replace_its_key() -> None:
    """A peer's key goes out as the only Authorization, after the client's own headers."""
    headers = [(b"authorization", b"Bearer sk-client"), (b"accept", b"*/*")]
    extra = [("Authorization", "Bearer peer-token")]
    assert outgoing_headers(headers, extra) == [("accept", "*/*"), ("Authorization", "Bearer peer-token")]


def test_expect_is_not_forwarded() -> None:
    """uvicorn answered the client's 100-continue before the body was read: the server gets the whole body."""
    headers = [(b"Expect", b"100-continue"), (b"accept", b"*/*")]
    assert outgoing_headers(headers, ()) == [("accept", "*/*")]


@pytest.mark.parametrize("name", [b"Host", b"Content-Length"])
def test_host_and_length_are_left_to_the_http_client(name: bytes) -> None:
    """The client's Host names the daemon, and the body may be rewritten (the model's name) before it goes:
    the HTTP client sets both from the URL and the body it sends."""
    headers = [(name, b"127.0.0.1:8080"), (b"accept", b"*/*")]
    assert outgoing_headers(headers, ()) == [("accept", "*/*")]


@pytest.mark.parametrize(
    "name", [b"Origin", b"Sec-Fetch-Site", b"Sec-Fetch-Mode", b"Sec-Fetch-Dest", b"Sec-Fetch-User"]
)
def test_the_pages_origin_and_fetch_metadata_are_not_forwarded(name: bytes) -> None:
    """The door decided which page may call; a server would answer CORS of its own, a peer decide again."""
    headers = [(name, b"https://evil.example"), (b"x-sec-fetch-site", b"kept")]
    assert outgoing_headers(headers, ()) == [("x-sec-fetch-site", "kept")]


# ---- relay: a server's answer back to the client --------------------------------------------------------


class Sent:
    """An ASGI `send` that keeps what it was given."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def __call__(self, message: Any) -> None:
        self.messages.append(message)

    @property
    def headers(self) -> Headers:
        return list(self.messages[0]["headers"])

    @property
    def body(self) -> bytes:
        return b"".join(m["body"] for m in self.messages[1:])


class Cut(Exception):
    """What a fake HTTP client raises when its server breaks off."""


async def chunks(*parts: bytes, then: Exception | None = None) -> AsyncIterator[bytes]:
    for part in parts:
        yield part
    if then is not None:
        raise then


async def test_a_stream_is_relayed_less_the_connections_and_the_servers_cors_headers() -> None:
    server_headers = [
        (b"Content-Type", b"text/event-stream"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Connection", b"keep-alive"),
        (b"Access-Control-Allow-Origin", b"*"),
        (b"X-Server", b"llama"),
    ]
    sent = Sent()
    answer = await relay(200, server_headers, chunks(b"data: 1\n\n", b"data: 2\n\n"), sent, 0.0, broke_off=(Cut,))
    assert sent.messages[0]["status"] == 200
    assert sent.headers == [
        (b"content-type", b"text/event-stream"),
        (b"x-server", b"llama"),
        (b"x-accel-buffering", b"no"),
    ]
    assert sent.body == b"data: 1\n\ndata: 2\n\n"
    assert sent.messages[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert answer.status == 200 and answer.streamed and answer.kept == b"data: 1\n\ndata: 2\n\n"
    assert answer.ttfb_s is not None


async def test_a_plain_answer_is_kept_whole_and_only_the_first_content_type_counts() -> None:
    server_headers = [(b"content-type", b"application/json"), (b"content-type", b"text/event-stream")]
    sent = Sent()
    answer = await relay(201, server_headers, chunks(b'{"a":', b"1}"), sent, 0.0, broke_off=(Cut,))
    assert (b"x-accel-buffering", b"no") not in sent.headers
    assert answer == Answer(status=201, streamed=False, ttfb_s=answer.ttfb_s, kept=b'{"a":1}')


async def test_a_stream_broken_off_ends_with_an_error_event_and_raises() -> None:
    sent = Sent()
    body = chunks(b"data: 1\n\n", then=Cut("reset by peer"))
    with pytest.raises(UpstreamFailed) as failed:
        await relay(200, [(b"content-type", b"text/event-stream")], body, sent, 0.0, broke_off=(Cut,))
    assert failed.value.sent and failed.value.reached
    assert failed.value.reason == "broke off in the middle of its answer: reset by peer"
    last = sent.messages[-1]
    assert last["more_body"] is False and last["body"].startswith(b"data: ")
    assert json.loads(last["body"][len(b"data: ") :])["error"]["code"] == "upstream_failed"


async def test_a_plain_answer_broken_off_raises_without_an_event() -> None:
    sent = Sent()
    body = chunks(b'{"a":', then=Cut("reset"))
    with pytest.raises(UpstreamFailed):
        await relay(200, [(b"content-type", b"application/json")], body, sent, 0.0, broke_off=(Cut,))
    assert sent.body == b'{"a":'


# ---- the aiohttp Upstream through the UpstreamClient interface, against a real server on loopback --------


@pytest.fixture
async def echo_url() -> AsyncIterator[str]:
    """A server that answers with the headers and the body length it received."""

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        received = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in request.raw_headers]
        return web.json_response({"headers": received, "length": len(body)}, headers={"Connection": "keep-alive"})

    app = web.Application()
    app.router.add_post("/echo", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/echo"
    finally:
        await runner.cleanup()


async def test_the_server_gets_its_own_host_and_the_bodys_length_and_the_peers_key(echo_url: str) -> None:
    client: UpstreamClient = Upstream()
    headers = [
        (b"host", b"door.example:8080"),
        (b"content-length", b"999"),
        (b"authorization", b"Bearer sk-client"),
        (b"expect", b"100-continue"),
        (b"x-request-id", b"7"),
    ]
    sent = Sent()
    try:
        answer = await client.forward("POST", echo_url, headers, b"12345", sent, 0.0, extra=[("Authorization", "t")])
    finally:
        await client.close()
    received = dict(json.loads(answer.kept)["headers"])
    assert received["host"] == echo_url.removeprefix("http://").removesuffix("/echo")
    assert received["content-length"] == "5" and json.loads(answer.kept)["length"] == 5
    assert received["authorization"] == "t" and received["x-request-id"] == "7"
    assert "expect" not in received
    assert (b"connection", b"keep-alive") not in sent.headers


async def test_a_server_nobody_listens_for_is_not_reached() -> None:
    with socket.socket() as sock:  # a loopback port that was free a moment ago, held closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        client: UpstreamClient = Upstream()
        try:
            with pytest.raises(UpstreamFailed) as failed:
                await client.forward("POST", f"http://127.0.0.1:{port}/", [], b"", Sent(), 0.0)
        finally:
            await client.close()
    assert not failed.value.reached and not failed.value.sent
