"""Safe from the web pages its user visits (issue 20): only the daemon's own names reach it (Host), no page
of another origin acts or reads (Origin, Sec-Fetch-Site; /v1 takes JSON only), CORS is answered for the
configured origins only, and what may hold secrets (a model's configured env, key options, log lines) is
shown only to the token holder. The same from a real browser's pages: tests/test_web_browser.py.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from launcher.api.origin import HostNames, from_another_page, split_host
from launcher.config_daemon import DaemonSettings
from tests.conftest import ConfigWriter, Daemon, poll_until, write_secret

StartDaemon = Callable[[Path], Daemon]
ROOT = Path(__file__).parent.parent
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
ALLOWED = "http://app.example:3000"  # the one origin configured in daemon.cors_origins below


# ---- the decisions ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bind", "allowed", "host", "admitted"),
    [
        ("127.0.0.1", [], "127.0.0.1:8400", True),
        ("127.0.0.1", [], "localhost:8400", True),
        ("127.0.0.1", [], "LOCALHOST", True),
        ("127.0.0.1", [], "[::1]:8400", True),
        ("127.0.0.1", [], "127.0.0.2", True),  # all of 127/8 is loopback
        ("127.0.0.1", [], "evil.example:8400", False),  # a rebinding page's own name
        ("127.0.0.1", [], "localhost.evil.example", False),
        ("127.0.0.1", [], "192.168.1.5:8400", False),
        ("127.0.0.1", [], "", False),
        ("127.0.0.1", [], "a b", False),
        ("127.0.0.1", [], "127.0.0.1:99999", False),
        ("127.0.0.1", [], "[evil]:8400", False),
        ("127.0.0.1", [], "user@127.0.0.1", False),
        ("192.168.1.5", [], "192.168.1.5:8400", True),  # the bind address
        ("192.168.1.5", [], "10.0.0.1:8400", False),
        ("0.0.0.0", [], "10.42.0.17:8400", True),  # a wildcard bind: any address (a pod's, a probe's)
        ("::", [], "[fd00::17]:8400", True),
        ("0.0.0.0", [], "gpu-box.lan:8400", False),  # a name must be listed
        ("0.0.0.0", ["gpu-box.lan"], "GPU-BOX.lan:8400", True),
        ("0.0.0.0", ["*.lan"], "gpu-box.lan", True),
        ("0.0.0.0", ["*.lan"], "lan", False),
        ("0.0.0.0", ["*.lan"], "gpu-box.lan.evil.example", False),
        ("127.0.0.1", ["*"], "anything.example", True),
    ],
)
def test_which_hosts_are_the_daemons_own(bind: str, allowed: list[str], host: str, admitted: bool) -> None:
    names = HostNames.of(DaemonSettings(host=bind, allowed_hosts=allowed))
    split = split_host(host)
    assert (split is not None and names.admit(split[0])) is admitted


OWN = ("127.0.0.1", 8400)


@pytest.mark.parametrize(
    ("method", "path", "origin", "site", "mode", "refused"),
    [
        ("POST", "/instances/m/stop", None, None, None, False),  # curl, the CLI, the OpenAI client
        ("POST", "/instances/m/stop", "http://127.0.0.1:8400", "same-origin", "cors", False),  # the dashboard
        ("POST", "/instances/m/stop", "http://evil.example", "cross-site", "no-cors", True),
        ("POST", "/instances/m/stop", "http://127.0.0.1:3000", "same-site", "no-cors", True),  # another port
        ("POST", "/instances/m/stop", "http://localhost:8400", "cross-site", "cors", True),  # another name
        ("POST", "/instances/m/stop", "null", "cross-site", "navigate", True),  # a sandboxed frame
        ("POST", "/instances/m/stop", "http://127.0.0.1:8400", "cross-site", "cors", True),  # one of them forged
        ("POST", "/v1/chat/completions", ALLOWED, "cross-site", "cors", False),  # configured
        ("GET", "/instances", "http://evil.example", "cross-site", "cors", True),  # reads too
        ("GET", "/upstream/m/props", None, "cross-site", "no-cors", True),  # <img src>: starts an on-demand model
        ("GET", "/upstream/m/props", None, "same-site", "no-cors", True),
        ("GET", "/ui", None, "cross-site", "navigate", False),  # a link to the dashboard
        ("GET", "/instances", None, "cross-site", "navigate", True),
        ("POST", "/ui", None, "cross-site", "navigate", True),
        ("GET", "/ui", None, "none", "navigate", False),  # typed, or a bookmark
        ("OPTIONS", "/upstream/m/completion", "http://evil.example", "cross-site", "cors", True),  # a preflight
    ],
)
def test_which_requests_another_page_sent(
    method: str, path: str, origin: str | None, site: str | None, mode: str | None, refused: bool
) -> None:
    why = from_another_page(
        method=method,
        path=path,
        origin=origin,
        fetch_site=site,
        fetch_mode=mode,
        host=OWN,
        cors_origins=frozenset({ALLOWED}),
    )
    assert (why is not None) is refused, why


def test_names_and_origins_are_checked_at_load() -> None:
    daemon = DaemonSettings(allowed_hosts=["gpu.lan", "*.cluster.local", "10.0.0.5", "[fd00::1]", "*"])
    assert daemon.allowed_hosts[0] == "gpu.lan"
    origins = ["HTTP://App.Example:3000/", "https://ui.example:443", "http://[::1]:5173", "http://x:80"]
    assert DaemonSettings(cors_origins=origins).cors_origins == [
        "http://app.example:3000",
        "https://ui.example",
        "http://[::1]:5173",
        "http://x",
    ]
    for bad in ("gpu.lan:8400", "http://gpu.lan", "a b", "-x"):
        with pytest.raises(ValueError, match="host name or an address without a port"):
            DaemonSettings(allowed_hosts=[bad])
    for bad, why in (
        ("*", "list each origin"),
        ("ftp://x", "should be an origin"),
        ("http://x/app", "should be an origin"),
        ("http://x?a=1", "without a query"),
        ("http://x:nope", "is not an origin"),
    ):
        with pytest.raises(ValueError, match=why):
            DaemonSettings(cors_origins=[bad])


def test_the_probes_of_the_containers_pass(tmp_path: Path) -> None:
    """Kubernetes probes and Prometheus name a pod by its address; Docker's probe asks 127.0.0.1."""
    configs = (ROOT / "kubernetes/base/launcher.yaml", ROOT / "docker/launcher.yaml")
    for config in configs:
        names = HostNames.of(DaemonSettings.model_validate(yaml.safe_load(config.read_text())["daemon"]))
        for probe in ("10.42.0.17:8400", "127.0.0.1:8400", "localhost"):
            assert names.admit(split_host(probe)[0]), (config, probe)  # type: ignore[index]
        assert not names.admit("evil.example"), config
    in_cluster = HostNames.of(DaemonSettings.model_validate(yaml.safe_load(configs[0].read_text())["daemon"]))
    assert all(in_cluster.admit(name) for name in ("launcher", "launcher.launcher.svc.cluster.local"))


# ---- a daemon ------------------------------------------------------------------------------------------


def raw_answer(port: int, request: bytes) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of one request written as it is (a Host missing or empty, as httpx cannot)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def is_error_body(body: Any) -> bool:
    return isinstance(body, dict) and set(body) == {"detail", "hint"} and isinstance(body["detail"], str)


def is_openai_error(body: Any) -> bool:
    return isinstance(body, dict) and set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"])


def test_only_the_daemons_own_names_reach_it(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    config = write_config(
        {"m": {"binary": str(standin), "autostart": True}}, daemon={"allowed_hosts": ["launcher.test", "*.lan"]}
    )
    daemon = start_daemon(config)
    before = daemon.wait_for("m", lambda s: s["state"] == "ready")
    port = urlsplit(daemon.url).port
    assert port is not None
    routes = [
        ("GET", "/health"),
        ("GET", "/instances"),
        ("GET", "/plan/m"),
        ("GET", "/metrics"),
        ("GET", "/ui"),
        ("GET", "/openapi.json"),
        ("POST", "/instances/m/stop"),
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/upstream/m/health"),
    ]
    with httpx.Client(base_url=daemon.url, timeout=30) as http:
        for host in (f"evil.example:{port}", "evil.example", f"lan:{port}", f"127.0.0.1.evil.example:{port}"):
            for method, path in routes:
                answer = http.request(method, path, headers={"Host": host}, json=CHAT | {"model": "m"})
                assert answer.status_code == 421, (host, method, path, answer.text)
                front_door = path.startswith(("/v1/", "/upstream/"))
                assert (is_openai_error if front_door else is_error_body)(answer.json()), answer.text
                assert f"not to Host '{host}'" in answer.text
        for host in (f"launcher.test:{port}", "gpu-box.lan", f"localhost:{port}", f"[::1]:{port}", "127.0.0.1"):
            assert http.get("/instances/m", headers={"Host": host}).json()["state"] == "ready", host
            assert http.get("/v1/models", headers={"Host": host}).status_code == 200, host
    for request, said in (
        (b"GET /health HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n", "an empty Host"),
        (b"GET /health HTTP/1.0\r\n\r\n", "a request without a Host"),
        (b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n", "a request without a Host"),
        (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n", "several"),
    ):
        status, body = raw_answer(port, request)
        assert status == 421 and is_error_body(body) and said in body["detail"], body
    after = daemon.instance("m")
    assert (after["state"], after["pid"], after["restarts"]) == ("ready", before["pid"], before["restarts"])


def test_pages_of_other_origins_are_refused_and_cors_is_ours(
    write_config: ConfigWriter, start_daemon: StartDaemon
) -> None:
    """With the real llama-server, which echoes any Origin it is sent with credentials allowed."""
    daemon = start_daemon(write_config({"tiny": {"autostart": True}}, daemon={"cors_origins": [ALLOWED]}))
    before = daemon.wait_for("tiny", lambda s: s["state"] == "ready")
    http, own = daemon.http, daemon.url
    evil = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}
    text = {"Content-Type": "text/plain"}
    for method, path, headers in (
        ("POST", "/instances/tiny/stop", evil | text),
        ("POST", "/instances/tiny/restart", {"Origin": "http://127.0.0.1:1"}),  # another local web server
        ("POST", "/instances/tiny/stop", {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "no-cors"}),
        ("POST", "/v1/chat/completions", evil | text),
        ("GET", "/upstream/tiny/props", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}),
        ("GET", "/upstream/tiny/props", {"Origin": "null"}),
        ("GET", "/plan/tiny", evil),
        ("OPTIONS", "/upstream/tiny/completion", evil | {"Access-Control-Request-Method": "POST"}),
        ("OPTIONS", "/v1/chat/completions", evil | {"Access-Control-Request-Method": "POST"}),
    ):
        answer = http.request(method, path, headers=headers, content=json.dumps(CHAT))
        assert answer.status_code == 403, (method, path, answer.text)
        assert not [k for k in answer.headers if k.startswith("access-control-")], answer.headers
        front_door = path.startswith(("/v1/", "/upstream/"))
        assert (is_openai_error if front_door else is_error_body)(answer.json()), answer.text
    after = daemon.instance("tiny")
    assert (after["state"], after["pid"], after["restarts"]) == ("ready", before["pid"], before["restarts"])

    # /v1 takes JSON only: what a page could send without asking first (text/plain, a form) is refused.
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        answer = http.post("/v1/chat/completions", content=json.dumps(CHAT), headers={"Content-Type": content_type})
        assert (answer.status_code, answer.json()["error"]["code"]) == (415, "unsupported_media"), content_type
    answer = http.post("/v1/chat/completions", content=json.dumps(CHAT))  # no Content-Type at all
    assert answer.status_code == 415

    # The daemon's own pages and clients that are not pages act as before.
    plain = http.post("/v1/chat/completions", json=CHAT)
    assert plain.status_code == 200 and not [k for k in plain.headers if k.startswith("access-control-")]
    own_page = http.post("/v1/chat/completions", json=CHAT, headers={"Origin": own, "Sec-Fetch-Site": "same-origin"})
    assert own_page.status_code == 200 and "access-control-allow-origin" not in own_page.headers

    # The configured origin: CORS answered by the daemon, the server's own headers gone (no credentials).
    preflight = http.options(
        "/upstream/tiny/completion",
        headers={
            "Origin": ALLOWED,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization",
        },
    )
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in preflight.headers
    for path, body in (("/v1/chat/completions", CHAT), ("/upstream/tiny/completion", {"prompt": "Hi", "n_predict": 2})):
        answer = http.post(path, json=body, headers={"Origin": ALLOWED, "Sec-Fetch-Site": "cross-site"})
        assert answer.status_code == 200, answer.text
        assert answer.headers.get_list("access-control-allow-origin") == [ALLOWED], answer.headers
        assert "access-control-allow-credentials" not in answer.headers
    props = http.get("/upstream/tiny/props", headers={"Origin": ALLOWED})
    assert props.headers.get_list("access-control-allow-origin") == [ALLOWED]


def test_secrets_only_to_the_token_holder(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path, tmp_path: Path
) -> None:
    secret = {"HF_TOKEN": "hf_s3cret", "OTHER_KEY": "k3y"}
    model = {"binary": str(standin), "autostart": True, "env": secret, "args": ["--api-key", "sk-1", "--api-key=sk-2"]}
    # No token configured (a default install): nobody holds one, so nobody sees them; log lines stay.
    open_daemon = start_daemon(write_config({"m": model}))
    open_daemon.wait_for("m", lambda s: s["state"] == "ready")
    plan = open_daemon.http.get("/plan/m").json()
    assert {k: plan["env"][k] for k in secret} == {"HF_TOKEN": "<redacted>", "OTHER_KEY": "<redacted>"}
    at = plan["command"].index("--api-key")
    assert plan["command"][at : at + 3] == ["--api-key", "<redacted>", "--api-key=<redacted>"]
    assert "hf_s3cret" not in open_daemon.http.get("/instances").text
    assert open_daemon.instance("m")["log_line"] is not None
    assert open_daemon.http.get("/instances/m/logs").status_code == 200
    open_daemon.stop()

    # A token configured, on loopback (reads open): the values and log lines to its holder only.
    write_secret(tmp_path / "token", "t0ken")
    (tmp_path / "b").mkdir()
    config = write_config({"m": model}, daemon={"token_file": str(tmp_path / "token")})
    daemon = start_daemon(config.rename(tmp_path / "b" / "launcher.yaml"))
    daemon.wait_for("m", lambda s: s["state"] == "ready")
    holder = {"Authorization": "Bearer t0ken"}
    for name, headers in (("stranger", {}), ("wrong", {"Authorization": "Bearer nope"}), ("holder", holder)):
        plan = daemon.http.get("/plan/m", headers=headers).json()
        status = daemon.http.get("/instances/m", headers=headers).json()
        [listed] = daemon.http.get("/instances", headers=headers).json()
        shown = name == "holder"
        assert (plan["env"]["HF_TOKEN"] == "hf_s3cret") is shown and (plan["env"]["OTHER_KEY"] == "k3y") is shown
        assert ("sk-1" in plan["command"]) is shown
        assert "hf_s3cret" not in json.dumps([status, listed])  # a status's plan holds no environment
        assert (status["log_line"] is not None) is shown and (listed["log_line"] is not None) is shown
        logs = daemon.http.get("/instances/m/logs", headers=headers)
        assert logs.status_code == (200 if shown else 401), (name, logs.text)
    # What the daemon sets itself is no secret: shown to all.
    assert "CUDA_DEVICE_ORDER" not in secret
    cli = daemon.cli("plan", "m")  # the CLI reads the token file: it holds the token
    assert "HF_TOKEN=hf_s3cret" in cli.stdout, cli.stdout + cli.stderr


def test_what_a_server_said_as_it_ended_is_for_the_token_holder(
    write_config: ConfigWriter, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A server's last words go into its last error and exit events (issue 19); they may echo its
    environment, so with a token configured they are the holder's alone, as its log is."""
    leaky = tmp_path / "leaky-server"
    leaky.write_text('#!/bin/sh\necho "loading with HF_TOKEN=$HF_TOKEN"\nexit 1\n')
    leaky.chmod(0o755)
    write_secret(tmp_path / "token", "t0ken")
    model = {"binary": str(leaky), "env": {"HF_TOKEN": "hf_s3cret"}, "restart": {"policy": "never"}}
    daemon = start_daemon(write_config({"m": model}, daemon={"token_file": str(tmp_path / "token")}))
    holder = {"Authorization": "Bearer t0ken"}
    assert daemon.http.post("/instances/m/start", headers=holder).status_code == 202
    shown = poll_until(
        lambda: daemon.http.get("/instances/m", headers=holder).json(), lambda s: s["state"] == "failed", "m", 30
    )
    assert shown["last_error"] == "loading with HF_TOKEN=hf_s3cret"
    stranger = daemon.http.get("/instances/m").json()
    hidden = "<the server's words: shown with the API token>"
    assert stranger["last_error"] == hidden
    assert [e["message"] for e in stranger["events"] if e["kind"] == "exit"] == [f"server exited with code 1: {hidden}"]
    for headers in ({}, holder):
        events = daemon.http.get("/events", params={"recent": 50, "follow": "false"}, headers=headers).text
        assert ("hf_s3cret" in events) is (headers == holder)
    assert "hf_s3cret" not in daemon.http.get("/instances").text
