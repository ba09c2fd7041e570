"""`ctx: max` through the daemon on a simulated GPU: the plan's context shrinks beside a running instance, a
real llama-server started on demand gets the chosen `-c` and answers, and an eviction makes room for the
floor and then sizes the context to the room it freed."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from launcher.tinymodel import TinyShape, write_tiny_llama
from tests.conftest import ConfigWriter, Daemon

# 4 KiB of f16 KV cache per cell, trained for 64k: on a GPU of 300 MiB with 100 MiB of driver overhead the
# context is what decides the memory.
LONG = TinyShape(n_layer=4, n_embd=256, n_head=4, n_head_kv=4, n_ff=256, context_length=65536)
GPUS = {
    "backend": "sim", "poll_interval": 0.1, "margin_mib": 0, "overhead_mib": 100,
    "sim": [{"name": "Sim", "memory_mib": 300}],
}  # fmt: skip


def chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def ctx_arg(status: dict[str, Any]) -> int:
    """The -c its server process was started with."""
    argv = psutil.Process(status["pid"]).cmdline()
    return int(argv[argv.index("--ctx-size") + 1])


def test_ctx_max_shrinks_beside_another_instance_and_the_server_gets_it(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon], tmp_path: Path
) -> None:
    long = write_tiny_llama(tmp_path / "models" / "long.gguf", LONG)
    models = {"tiny": {}, "long": {"model": str(long), "ctx": "max", "ctx_min": 1024, "on_demand": True}}
    daemon = start_daemon(write_config(models, gpus=GPUS))

    alone = daemon.http.get("/plan/long").json()
    assert alone["fits"] and alone["context"]["step"] == 256 and alone["ctx"] % 256 == 0
    assert alone["context"]["reason"].startswith(f"ctx {alone['ctx']}: the largest that fits GPU 0; ")

    assert daemon.cli("up", "tiny").returncode == 0
    claim = daemon.wait_for("tiny", lambda s: s["state"] == "ready")["vram_mib"]
    beside = daemon.http.get("/plan/long").json()
    assert beside["fits"] and beside["ctx"] < alone["ctx"]
    # a 256-cell step takes 1 MiB of KV and a little more compute: fewer steps than the MiB claimed
    assert claim * 3 // 4 <= (alone["ctx"] - beside["ctx"]) // 256 <= claim
    reason = beside["context"]["reason"]
    assert f"beside the other instances' {claim} MiB on GPU 0; ctx {beside['ctx'] + 256} would need " in reason
    assert beside["command"][beside["command"].index("--ctx-size") + 1] == str(beside["ctx"])

    # the front door starts it on demand, with the context planned then
    answer = daemon.http.post("/v1/chat/completions", json=chat("long"))
    assert answer.status_code == 200, answer.text
    status = daemon.instance("long")
    assert status["state"] == "ready"
    assert status["plan"]["ctx"] == beside["ctx"] == ctx_arg(status)
    assert daemon.http.get("/upstream/long/props").json()["default_generation_settings"]["n_ctx"] == beside["ctx"]
    shown = daemon.cli("plan", "long")
    assert shown.returncode == 0
    assert f"ctx: max chose ctx {beside['ctx']}: the largest that fits GPU 0 beside" in shown.stdout
    assert f"--ctx-size {beside['ctx']}" in shown.stdout


def test_an_eviction_makes_room_for_ctx_min_and_the_context_fills_what_it_freed(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon], standin: Path, tmp_path: Path
) -> None:
    long = write_tiny_llama(tmp_path / "models" / "long.gguf", LONG)
    on_demand = {"binary": str(standin), "on_demand": True, "health": {"interval": 0.2}}
    models = {"a": dict(on_demand), "b": {**on_demand, "model": str(long), "ctx": "max", "ctx_min": 20480}}
    daemon = start_daemon(write_config(models, gpus=GPUS))
    alone = daemon.http.get("/plan/b").json()["ctx"]

    assert daemon.http.post("/v1/chat/completions", json=chat("a")).status_code == 200
    crowded = daemon.http.get("/plan/b").json()
    assert not crowded["fits"] and crowded["reason"].startswith("not even ctx_min 20480 fits the GPUs whole: ")

    assert daemon.http.post("/v1/chat/completions", json=chat("b")).status_code == 200
    assert daemon.instance("a")["state"] == "stopped"  # evicted for b's floor
    status = daemon.instance("b")
    assert status["plan"]["ctx"] == alone == ctx_arg(status)  # and b sized to the whole GPU again
    lines = daemon.http.get("/events", params={"recent": 500, "follow": False}).iter_lines()
    events = [json.loads(line.removeprefix("data: "))["message"] for line in lines if line.startswith("data: ")]
    assert any("stopping idle a to make room for b" in e for e in events)


def test_without_gpus_a_real_llama_server_gets_the_cap_and_answers(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon], tmp_path: Path
) -> None:
    long = write_tiny_llama(tmp_path / "models" / "long.gguf", LONG)
    models = {"long": {"model": str(long), "ctx": "max", "ctx_max": 8000, "autostart": True}}
    daemon = start_daemon(write_config(models))  # gpus: none, everything on the CPU
    status = daemon.wait_for("long", lambda s: s["state"] == "ready")
    assert status["plan"]["ctx"] == 7936 == ctx_arg(status)  # ctx_max rounded down to llama.cpp's 256
    assert "no GPU to size it to" in status["plan"]["context"]["reason"]
    assert daemon.http.post("/v1/chat/completions", json=chat("long")).status_code == 200
    # the server's own word: one slot may use all of it (one unified KV cache)
    assert daemon.http.get("/upstream/long/props").json()["default_generation_settings"]["n_ctx"] == 7936
