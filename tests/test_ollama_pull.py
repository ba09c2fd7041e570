"""An Ollama model not in Ollama's store, pulled through Ollama's /api/pull before its start (a real daemon,
the Ollama stand-in, whose registry is a file on disk): `downloading` with Ollama's progress, then ready;
Ollama's error line as one sentence."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import ollama

from launcher.tinymodel import write_tiny_llama
from tests.conftest import ConfigWriter, Daemon
from tests.test_ollama import ollama_model, sim_gpus

StartDaemon = Callable[[Path], Daemon]


def pulled_model(standin: Path, tmp_path: Path, name: str, **env: str) -> dict[str, Any]:
    """``name`` not in the store at tmp_path/store; the stand-in's registry has the tiny model as tiny:1b."""
    registry = write_tiny_llama(tmp_path / "registry" / "tiny.gguf")
    model = ollama_model(
        standin, tmp_path, model=name, ollama={"size_mib": None, "models_dir": str(tmp_path / "store")}
    )
    model["env"] |= {"STANDIN_REGISTRY": f"tiny:1b={registry}", **env}
    return model


async def test_a_model_not_in_the_store_is_pulled_with_progress_then_serves(
    write_config: ConfigWriter, start_daemon: StartDaemon, ollama_standin: Path, tmp_path: Path
) -> None:
    model = pulled_model(ollama_standin, tmp_path, "tiny:1b", STANDIN_PULL_STEPS="6", STANDIN_PULL_STEP_S="0.4")
    daemon = start_daemon(write_config({"ol": {**model, "on_demand": True}}, gpus=sim_gpus(1)))
    size = (tmp_path / "registry" / "tiny.gguf").stat().st_size
    started = daemon.http.post("/instances/ol/start")
    assert started.status_code == 202 and started.json()["state"] == "downloading", started.text
    status = daemon.wait_for("ol", lambda s: (s["download"] or {}).get("done_bytes", 0) > 0)
    assert status["state"] == "downloading" and status["download"]["total_bytes"] == size
    assert status["download"]["file"].startswith("tiny:1b (sha256:")
    assert any(e["kind"] == "download" and " MB (" in e["message"] for e in status["events"])
    answer = daemon.http.post(
        "/v1/chat/completions", json={"model": "ol", "messages": [{"role": "user", "content": "Hi"}]}
    )
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "downloading"
    assert answer.json()["error"]["message"].startswith("ol is downloading: ")
    assert 1 <= int(answer.headers["retry-after"]) <= 60
    ready = daemon.wait_for("ol", lambda s: s["state"] in ("ready", "failed"))
    assert ready["state"] == "ready", ready["last_error"]
    assert ready["plan"]["devices"][0]["layers"] == 4  # planned from the pulled blob's real shape
    assert (tmp_path / "store" / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "1b").is_file()
    native = ollama.AsyncClient(host=f"{daemon.url}/upstream/ol")
    reply = await native.chat(model="tiny:1b", messages=[{"role": "user", "content": "Hi"}])
    assert reply.message.content == "stand-in"


def test_a_model_the_registry_lacks_fails_in_one_sentence(
    write_config: ConfigWriter, start_daemon: StartDaemon, ollama_standin: Path, tmp_path: Path
) -> None:
    model = pulled_model(ollama_standin, tmp_path, "nope:7b")
    daemon = start_daemon(write_config({"ol": model}, gpus=sim_gpus(1)))
    assert daemon.http.post("/instances/ol/start").json()["state"] == "downloading"
    failed = daemon.wait_for("ol", lambda s: s["state"] in ("ready", "failed"))
    assert failed["state"] == "failed"
    assert failed["last_error"] == "Ollama could not pull nope:7b: pull model manifest: file does not exist"
