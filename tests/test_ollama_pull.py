"""An Ollama model not in Ollama's store, planned from the registry's manifest, then pulled through Ollama's
/api/pull before its start (a real daemon, the Ollama stand-in, and a second stand-in as the registry):
`downloading` with Ollama's progress, then ready; errors in one sentence."""

from __future__ import annotations

import http.server
import io
import json
import re
import subprocess
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from launcher.backends.ollama_registry import registry_model_bytes
from launcher.errors import ConfigError, StartError
from launcher.supervise.ollama_downloads import PULL_LINE_MAX_BYTES, PULL_MAX_LAYERS, PullStream
from launcher.tinymodel import write_tiny_llama
from tests.conftest import ConfigWriter, Daemon, assert_downloading, free_port, poll_until, run_cli
from tests.test_ollama import ollama_model, sim_gpus

StartDaemon = Callable[[Path], Daemon]
HI = {"model": "ol", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture
def registry(ollama_standin: Path, marked_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """A registry (the stand-in's manifest route) whose one model, tiny:1b, is the tiny model; its URL."""
    blob = write_tiny_llama(tmp_path / "registry" / "tiny.gguf")
    port = free_port()
    env = marked_env | {"OLLAMA_HOST": f"127.0.0.1:{port}", "STANDIN_REGISTRY": f"tiny:1b={blob}"}
    server = subprocess.Popen([str(ollama_standin), "serve"], env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        poll_until(lambda: _answers(url), bool, "the registry", 30)
        yield url
    finally:
        server.terminate()
        server.wait(10)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/api/version").status_code == 200
    except httpx.HTTPError:
        return False


def pulled_model(standin: Path, tmp_path: Path, registry: str, name: str, **env: str) -> dict[str, Any]:
    """``name`` not in the store at tmp_path/store; the registry, and the pull, have the tiny model as tiny:1b."""
    where = {"size_mib": None, "models_dir": str(tmp_path / "store"), "registry": registry}
    model = ollama_model(standin, tmp_path, model=name, ollama=where)
    model["env"] |= {"STANDIN_REGISTRY": f"tiny:1b={tmp_path / 'registry' / 'tiny.gguf'}", **env}
    return model


async def test_a_model_not_in_the_store_is_planned_from_the_registry_pulled_with_progress_then_serves(
    write_config: ConfigWriter, start_daemon: StartDaemon, ollama_standin: Path, tmp_path: Path, registry: str
) -> None:
    pulled = pulled_model(
        ollama_standin, tmp_path, registry, "tiny:1b", STANDIN_PULL_STEPS="6", STANDIN_PULL_STEP_S="0.4"
    )
    daemon = start_daemon(write_config({"ol": {**pulled, "on_demand": True}}, gpus=sim_gpus(1)))
    size = (tmp_path / "registry" / "tiny.gguf").stat().st_size
    planned = daemon.http.get("/plan/ol").json()
    assert planned["fits"] and planned["architecture"] == "unknown", planned  # by its size in the manifest
    started = daemon.http.post("/instances/ol/start")
    assert started.status_code == 202 and started.json()["state"] == "downloading", started.text
    status = daemon.wait_for("ol", lambda s: (s["download"] or {}).get("done_bytes", 0) > 0)
    assert status["state"] == "downloading" and status["download"]["total_bytes"] == size
    assert status["download"]["file"].startswith("tiny:1b (sha256:")
    assert any(e["kind"] == "download" and " MB (" in e["message"] for e in status["events"])
    assert re.search(r"\nol: downloading: [\d.]+ of [\d.]+ MB \(\d+ %\)", daemon.cli("status").stdout)
    assert_downloading(daemon.http.post("/v1/chat/completions", json=HI), "ol")
    ready = daemon.wait_for("ol", lambda s: s["state"] in ("ready", "failed"))
    assert ready["state"] == "ready", ready["last_error"]
    assert ready["plan"]["devices"][0]["layers"] == 4  # planned from the pulled blob's real shape
    assert (tmp_path / "store" / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "1b").is_file()
    native = ollama.AsyncClient(host=f"{daemon.url}/upstream/ol")
    reply = await native.chat(model="tiny:1b", messages=[{"role": "user", "content": "Hi"}])
    assert reply.message.content == "stand-in"


def test_a_model_the_registry_lacks_is_refused_before_the_pull_in_one_sentence(
    write_config: ConfigWriter, start_daemon: StartDaemon, ollama_standin: Path, tmp_path: Path, registry: str
) -> None:
    daemon = start_daemon(write_config({"ol": pulled_model(ollama_standin, tmp_path, registry, "nope:7b")}))
    refused = daemon.http.post("/instances/ol/start")
    assert refused.status_code == 422, refused.text
    assert refused.json()["detail"] == f"the Ollama registry at {registry} has no model nope:7b"
    shown = daemon.instance("ol")
    assert shown["state"] == "stopped" and shown["last_error"] == refused.json()["detail"]


def test_a_pull_that_fails_midway_leaves_the_instance_failed_with_ollamas_words(
    write_config: ConfigWriter, start_daemon: StartDaemon, ollama_standin: Path, tmp_path: Path, registry: str
) -> None:
    down = "max retries exceeded: dial tcp: lookup registry.ollama.ai: no such host"
    pulled = pulled_model(ollama_standin, tmp_path, registry, "tiny:1b", STANDIN_PULL_ERROR=down)
    daemon = start_daemon(write_config({"ol": pulled}, gpus=sim_gpus(1)))
    assert daemon.http.post("/instances/ol/start").json()["state"] == "downloading"
    failed = daemon.wait_for("ol", lambda s: s["state"] in ("ready", "failed"))
    assert failed["state"] == "failed"
    assert failed["last_error"] == f"Ollama could not pull tiny:1b: {down}"
    assert not (tmp_path / "store" / "manifests").exists()  # nothing in the store to plan a start from


def test_a_pull_stream_line_without_end_fails_the_pull_at_its_bound(
    write_config: ConfigWriter, start_daemon: StartDaemon, ollama_standin: Path, tmp_path: Path, registry: str
) -> None:
    """Ollama's lines are a few hundred bytes: one of 64 MiB is not held whole before it is refused."""
    pulled = pulled_model(ollama_standin, tmp_path, registry, "tiny:1b", STANDIN_PULL_ENDLESS_LINE="1")
    daemon = start_daemon(write_config({"ol": pulled}, gpus=sim_gpus(1)))
    assert daemon.http.post("/instances/ol/start").json()["state"] == "downloading"
    failed = daemon.wait_for("ol", lambda s: s["state"] in ("ready", "failed"))
    assert failed["state"] == "failed"
    assert failed["last_error"] == f"Ollama's pull of tiny:1b answered a line over {PULL_LINE_MAX_BYTES // 1024} KiB"


def test_a_pull_the_front_door_began_ends_at_a_stop_with_its_ollama_server(
    write_config: ConfigWriter, start_daemon: StartDaemon, ollama_standin: Path, tmp_path: Path, registry: str
) -> None:
    slow = pulled_model(
        ollama_standin, tmp_path, registry, "tiny:1b", STANDIN_PULL_STEPS="50", STANDIN_PULL_STEP_S="0.5"
    )
    daemon = start_daemon(write_config({"ol": {**slow, "on_demand": True}}, gpus=sim_gpus(1)))
    assert_downloading(daemon.http.post("/v1/chat/completions", json=HI), "ol")
    daemon.wait_for("ol", lambda s: s["download"] is not None)
    stopped = daemon.http.post("/instances/ol/stop")
    assert stopped.status_code == 202 and stopped.json()["state"] == "stopped", stopped.text
    assert not (tmp_path / "store" / "manifests").exists()
    # the pull's `ollama serve` is gone (leaves_no_process checks every marked process at the end)


def test_launcher_pull_of_an_ollama_model_says_the_daemons_ollama_pulls_it(
    write_config: ConfigWriter, marked_env: dict[str, str], ollama_standin: Path, tmp_path: Path
) -> None:
    config = write_config({"ol": ollama_model(ollama_standin, tmp_path, model="tiny:1b")})
    result = run_cli("--config", str(config), "pull", "ol", env=marked_env)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "ol is an Ollama model: Ollama pulls it through its own server, which the daemon runs" in result.stderr
    assert "`launcher up ol` pulls it through the daemon's Ollama" in result.stderr


def test_ollamas_progress_lines_are_summed_over_its_layers_and_its_error_line_is_one_sentence() -> None:
    stream = PullStream("qwen2.5:7b")
    assert stream.line('{"status": "pulling manifest"}') is None
    stream.line('{"status": "pulling 2bada8a74506", "digest": "sha256:2bada8a7", "total": 4000}')  # none done yet
    stream.line('{"status": "pulling 66b9ea09bd5b", "digest": "sha256:66b9ea09", "total": 68, "completed": 68}')
    progress = stream.line(
        '{"status": "pulling 2bada8a74506", "digest": "sha256:2bada8a7", "total": 4000, "completed": 1000}'
    )
    assert progress is not None and (progress.done_bytes, progress.total_bytes) == (1068, 4068)
    with pytest.raises(
        StartError, match=r"^Ollama could not pull qwen2\.5:7b: pull model manifest: file does not exist$"
    ):
        stream.line('{"error": "pull model manifest: file does not exist"}')
    with pytest.raises(StartError, match=r"^Ollama's pull of qwen2\.5:7b answered something not JSON: '<html>'$"):
        stream.line("<html>")


@pytest.mark.parametrize(
    "said",
    [
        {"total": -4000, "completed": 0},
        {"total": 4000, "completed": -1000},
        {"total": 2**63, "completed": 1000},  # absurd: 8 EiB
        {"total": True, "completed": True},  # JSON's true is no byte count
        {"total": 4000.5, "completed": 1000},
    ],
)
def test_a_progress_line_with_a_negative_or_absurd_size_is_not_shown(said: dict[str, object]) -> None:
    stream = PullStream("qwen2.5:7b")
    layer = {"status": "pulling 66b9ea09bd5b", "digest": "sha256:66b9ea09", "total": 68, "completed": 34}
    shown = stream.line(json.dumps(layer))
    assert shown is not None and (shown.done_bytes, shown.total_bytes) == (34, 68)
    assert stream.line(json.dumps({"status": "pulling 2bada8a74506", "digest": "sha256:2bada8a7", **said})) is None
    assert stream.line(json.dumps(layer | {"completed": 68})) == replace(shown, done_bytes=68)  # the line ignored


def test_progress_keeps_at_most_max_layers_and_short_digests() -> None:
    """A stream of endless distinct digests (or one huge digest) does not grow the progress kept: a model
    has a handful of layers; digests past the bound, and digests longer than a digest, are not shown."""
    stream = PullStream("qwen2.5:7b")
    shown = [stream.line(json.dumps({"digest": f"sha256:{i:064x}", "total": 10, "completed": 5})) for i in range(64)]
    last = shown[-1]
    assert len(shown) == PULL_MAX_LAYERS and None not in shown and last is not None
    assert (last.done_bytes, last.total_bytes) == (5 * PULL_MAX_LAYERS, 10 * PULL_MAX_LAYERS)
    assert stream.line(json.dumps({"digest": "sha256:" + "f" * 64, "total": 10, "completed": 5})) is None
    assert stream.line(json.dumps({"digest": "sha256:" + "e" * 2**20, "total": 10, "completed": 5})) is None
    known = stream.line(json.dumps({"digest": f"sha256:{0:064x}", "total": 10, "completed": 10}))  # still followed
    assert known is not None and known.done_bytes == 5 * PULL_MAX_LAYERS + 5


@contextmanager
def registry_double(send: Callable[[io.BufferedIOBase], object], *, head: bool = True) -> Iterator[str]:
    """A registry on loopback whose every answer is 200 with the body ``send`` writes (ended by closing the
    connection), or, ``head`` False, whatever ``send`` writes, status line and headers included; its URL."""

    class Registry(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if head:
                self.send_response(200)
                self.end_headers()
            with suppress(OSError):  # the client stopped reading
                send(self.wfile)

        def log_message(self, *args: object) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Registry)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.mark.parametrize("manifest", [{"layers": 5}, {"layers": None}, {"layers": {"size": 1}}, [1], "text"])
def test_a_manifest_that_is_not_one_is_one_sentence(manifest: object) -> None:
    with (
        registry_double(lambda out: out.write(json.dumps(manifest).encode())) as url,
        pytest.raises(ConfigError, match="lists no model layer with its size"),
    ):
        registry_model_bytes("tiny:1b", url)


def test_a_registry_that_sends_without_end_is_refused_after_1_mib_read_as_it_came() -> None:
    """64 MiB of JSON blanks offered (before: all read, then the 1 MiB check): at most the limit is held."""
    offered, chunk = 64 * 1024 * 1024, b" " * 65536

    def endless(out: io.BufferedIOBase) -> None:
        for _ in range(offered // len(chunk)):
            out.write(chunk)

    with registry_double(endless) as url:
        tracemalloc.start()
        try:
            with pytest.raises(ConfigError) as refused:
                registry_model_bytes("tiny:1b", url)
            peak_bytes = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert refused.value.message == (
        f"the Ollama registry at {url} answered more than 1024 KiB for tiny:1b's manifest (a few hundred bytes)"
    )
    assert peak_bytes < 4 * 1024 * 1024, peak_bytes


def test_a_registry_that_trickles_its_headers_is_refused_at_the_timeout_in_all() -> None:
    """A header byte each 50 ms for up to 10 s: each read within the timeout, the whole not (before: the
    headers were waited for whole, the timeout counted only over the body)."""

    def trickle_head(out: io.BufferedIOBase) -> None:
        out.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        for _ in range(200):
            out.write(b"a")
            out.flush()
            time.sleep(0.05)

    with registry_double(trickle_head, head=False) as url, pytest.raises(ConfigError) as refused:
        registry_model_bytes("tiny:1b", url, timeout_s=1.0)
    assert refused.value.message == (
        f"the Ollama registry at {url} took more than 1 s to answer for tiny:1b's manifest (a few hundred bytes)"
    )


def test_a_registry_that_sends_a_byte_at_a_time_is_refused_at_the_timeout_in_all() -> None:
    """A blank each 50 ms for up to 10 s: each read within the timeout, the whole not (before: all waited for)."""

    def trickle(out: io.BufferedIOBase) -> None:
        for _ in range(200):
            out.write(b" ")
            out.flush()
            time.sleep(0.05)

    with registry_double(trickle) as url, pytest.raises(ConfigError) as refused:
        registry_model_bytes("tiny:1b", url, timeout_s=1.0)
    assert refused.value.message == (
        f"the Ollama registry at {url} took more than 1 s to answer for tiny:1b's manifest (a few hundred bytes)"
    )
