"""A page of another origin, in a real browser, neither acts on the daemon nor reads from it (issue 20);
the dashboard on the daemon's own origin still acts.

Debian's chromium (as tests/test_ui.py) opens pages of two other origins, served by a small HTTP server of
the test's own: `http://localhost:PORT` (another site to the daemon's 127.0.0.1) and `http://127.0.0.1:PORT`
(the same site, another port: any other local web server). Each tries the acts and reads the hostile run
found (stop, start, restart with text/plain, a form's body, no body and a real form; /v1 with text/plain,
of a running and of an on-demand model; /upstream reads and a preflighted POST; the API's reads); what the
daemon answered is read from the browser's network events, what the page could read from the page.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from playwright.sync_api import Browser

from tests.conftest import ConfigWriter, poll_until
from tests.test_ui import GPUS, WAIT_MS, Dashboard
from tests.test_web_safety import CHAT, StartDaemon


class _Blank(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><title>another site</title><iframe name=sink></iframe>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def other_site() -> Iterator[int]:
    """The port of a web server on loopback that serves a blank page: another origin to the daemon."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Blank)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


# An attempt, run in the page: what the page could read of the answer ("opaque": nothing, as a no-cors
# request gets; "error: ...": the browser refused it to the page; else the status and the body's start).
FETCH = """async ([url, init]) => {
  try {
    const r = await fetch(url, init);
    return r.type === "opaque" ? "opaque" : `read ${r.status}: ${(await r.text()).slice(0, 80)}`;
  } catch (e) { return `error: ${e}`; }
}"""
# A real form, posted into the page's frame.
FORM = """([url]) => new Promise((resolve) => {
  const form = Object.assign(document.createElement("form"), {method: "post", action: url, target: "sink"});
  form.innerHTML = '<input name="a" value="b">';
  document.body.append(form);
  document.querySelector("iframe").addEventListener("load", () => resolve("opaque"), {once: true});
  form.submit();
})"""
TEXT = {"Content-Type": "text/plain"}
FORM_BODY = {"Content-Type": "application/x-www-form-urlencoded"}
# Each act and read of the hostile run: a name, the path, and fetch()'s init (None: a real form's POST).
ATTEMPTS: list[tuple[str, str, dict[str, Any] | None]] = [
    *(
        (f"{verb}, {kind}", f"/instances/tiny/{verb}", {"method": "POST", "mode": "no-cors", **init})
        for verb in ("stop", "start", "restart")
        for kind, init in (
            ("text/plain", {"body": "x", "headers": TEXT}),
            ("a form's body", {"body": "a=b", "headers": FORM_BODY}),
            ("no body", {}),
        )
    ),
    ("restart, a real form", "/instances/tiny/restart", None),
    (
        "/v1 chat, text/plain, read",
        "/v1/chat/completions",
        {"method": "POST", "body": json.dumps(CHAT), "headers": TEXT},
    ),
    (
        "/v1 chat of the on-demand model",
        "/v1/chat/completions",
        {"method": "POST", "body": json.dumps(CHAT | {"model": "od"}), "headers": TEXT},
    ),
    ("/upstream props, read", "/upstream/tiny/props", {}),
    ("/upstream props of the on-demand model, no-cors", "/upstream/od/props", {"mode": "no-cors"}),
    (
        "/upstream completion, JSON (preflighted)",
        "/upstream/tiny/completion",
        {
            "method": "POST",
            "body": json.dumps({"prompt": "Hi", "n_predict": 2}),
            "headers": {"Content-Type": "application/json"},
        },
    ),
    ("/instances, read", "/instances", {}),
    ("/plan, read", "/plan/tiny", {}),
]


def cross_site_attempts(chromium: Browser, page_url: str, daemon_url: str) -> dict[str, tuple[str, list[str]]]:
    """Each of ATTEMPTS from a page at ``page_url``: what the page could read, and what the daemon answered
    to each request the browser sent for it (a preflight first, where one was asked), as "METHOD STATUS"
    and any Access-Control-* header, read from the browser's network events (Chrome DevTools Protocol:
    they carry answers the page itself is not shown)."""
    page = chromium.new_page()
    page.set_default_timeout(WAIT_MS)
    network = page.context.new_cdp_session(page)
    network.send("Network.enable")
    # By request id, as the events come (an answer's may come before its request's): the request's method
    # and the attempt it is for; the answer's status and Access-Control-* headers as it arrived, before the
    # browser decides what the page may see of it.
    sent: dict[str, tuple[str, int]] = {}
    arrived: dict[str, list[str]] = {}

    def request(event: dict[str, Any]) -> None:
        url = event["request"]["url"]
        if url.startswith(daemon_url) and "attempt=" in url:
            sent[event["requestId"]] = (event["request"]["method"], int(url.rpartition("attempt=")[2]))

    def response(event: dict[str, Any]) -> None:
        cors = [f"{k}: {v}" for k, v in event["headers"].items() if k.lower().startswith("access-control-")]
        arrived[event["requestId"]] = [str(event["statusCode"]), *cors]

    def answered() -> dict[int, list[str]]:
        answers: dict[int, list[str]] = {}
        for request_id, (method, index) in sent.items():
            if request_id in arrived:
                answers.setdefault(index, []).append(" ".join([method, *arrived[request_id]]))
        return answers

    network.on("Network.requestWillBeSent", request)
    network.on("Network.responseReceivedExtraInfo", response)
    page.goto(page_url)
    read = []
    for index, (_name, path, init) in enumerate(ATTEMPTS):
        url = f"{daemon_url}{path}?attempt={index}"  # which attempt a request is for, in its network events
        read.append(page.evaluate(FORM, [url]) if init is None else page.evaluate(FETCH, [url, init]))

    def unanswered() -> list[str]:
        page.evaluate("0")  # the network events are handed over while the browser is asked something
        return [name for index, (name, _path, _init) in enumerate(ATTEMPTS) if index not in answered()]

    poll_until(unanswered, lambda missing: not missing, "the daemon's answer to every attempt", WAIT_MS / 1000)
    page.close()
    answers = answered()
    return {name: (read[index], answers[index]) for index, (name, _path, _init) in enumerate(ATTEMPTS)}


def test_a_page_of_another_origin_neither_acts_nor_reads(
    write_config: ConfigWriter, start_daemon: StartDaemon, browser: Browser, other_site: int
) -> None:
    models = {"tiny": {"autostart": True, "gpus": [0]}, "od": {"on_demand": True, "gpus": [0]}}
    daemon = start_daemon(write_config(models, gpus=GPUS))
    before = daemon.wait_for("tiny", lambda s: s["state"] == "ready")
    for page_url in (f"http://localhost:{other_site}/", f"http://127.0.0.1:{other_site}/"):
        for name, (read, answers) in cross_site_attempts(browser, page_url, daemon.url).items():
            assert read == "opaque" or read.startswith("error: TypeError"), (page_url, name, read)
            # One request reached the daemon, refused without any Access-Control-* header: a preflight,
            # refused, keeps the request itself from going out.
            assert len(answers) == 1 and answers[0].split()[1:] == ["403"], (page_url, name, answers)
        after = daemon.instance("tiny")
        assert (after["state"], after["pid"], after["restarts"]) == ("ready", before["pid"], before["restarts"]), (
            page_url
        )
        assert daemon.instance("od")["state"] == "stopped", page_url
    assert daemon.http.get("/requests").json() == []  # nothing reached the front door

    # The dashboard on its own origin still acts: it starts the on-demand model and stops it again.
    page = Dashboard(browser, daemon)
    card = '[data-instance="od"]'
    page.page.wait_for_selector(f"{card} .state.stopped")
    page.page.click(f"{card} button.start")
    page.page.wait_for_selector(f"{card} .state.ready")
    page.page.click(f"{card} button.stop")
    page.page.wait_for_selector(f"{card} .state.stopped")
    assert page.unexpected_errors() == []
