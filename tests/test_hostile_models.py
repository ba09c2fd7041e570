"""Model files cannot stall or sink the launcher: a FIFO, a directory or a device where a model or its
projector should be, headers with absurd counts, wrong-typed keys, unknown versions or a cut-short file are
each one sentence (in the API's ErrorBody, on the instance, from `launcher plan`, `up` and `doctor`),
never a hang, a traceback or a plain-text 500, and the daemon answers throughout."""

from __future__ import annotations

import asyncio
import json
import math
import os
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from fastapi import Request

from launcher.api.disconnect import unless_gone
from launcher.supervise.planning import PlanningThreads
from launcher.tinymodel import TinyShape, write_tiny_llama
from tests.conftest import ConfigWriter, Daemon, run_cli

_SHAPE = {"block_count": 4, "embedding_length": 64, "attention.head_count": 4, "attention.head_count_kv": 2,
          "context_length": 2048, "feed_forward_length": 128}  # fmt: skip
_TYPE_OF = {str: gguf.GGUFValueType.STRING, float: gguf.GGUFValueType.FLOAT32, int: gguf.GGUFValueType.UINT32}


def header(path: Path, **keys: Any) -> Path:
    """A llama header (no tensors) with ``keys`` over a small model's (dots as __ in the names); a list
    value is written as an array of uint32, an empty one too (GGUFWriter refuses to write it: it is
    written with one value, then cut to none)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    empty = []
    for key, value in (_SHAPE | {k.replace("__", "."): v for k, v in keys.items()}).items():
        if isinstance(value, list):
            empty += [] if value else [f"llama.{key}"]
            writer.add_key_value(f"llama.{key}", value or [0], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32)
        else:
            writer.add_key_value(f"llama.{key}", value, _TYPE_OF[type(value)])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    data = path.read_bytes()
    for key in empty:  # key, then type (array), item type, count (1) and the one value
        name = struct.pack("<Q", len(key)) + key.encode()
        count = data.index(name) + len(name) + 8
        data = data[:count] + struct.pack("<Q", 0) + data[count + 12 :]
    path.write_bytes(data)
    return path


def with_version(path: Path, version: int) -> Path:
    """The header at ``path`` claiming GGUF ``version`` (the 4 bytes after the magic)."""
    data = bytearray(header(path).read_bytes())
    data[4:8] = struct.pack("<I", version)
    path.write_bytes(bytes(data))
    return path


def endless_tensor(path: Path) -> Path:
    """A header with one tensor of 2^64-1 elements (f32: 2^66 bytes, whatever the file's size)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in _SHAPE.items():
        writer.add_uint32(f"llama.{key}", value)
    writer.add_tensor_info(
        "blk.0.attn_q.weight", (2**64 - 1,), np.dtype(np.float32), 0, raw_dtype=gguf.GGMLQuantizationType.F32
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


def hostile_models(folder: Path) -> dict[str, tuple[dict[str, Any], str]]:
    """Model entries and the exact sentence each one's plan and start answer."""
    folder.mkdir()
    fifo = folder / "pipe.gguf"
    os.mkfifo(fifo)
    (folder / "dir.gguf").mkdir()
    cut = write_tiny_llama(folder / "cut.gguf", TinyShape(extra_tokens=5000))
    cut.write_bytes(cut.read_bytes()[:20000])  # inside the vocabulary
    should = "it should be a whole number from"
    models: dict[str, tuple[dict[str, Any], str]] = {
        "fifo-model": ({"model": str(fifo)}, f"model file {fifo} for 'fifo-model' is a FIFO, not a regular file"),
        "dir-model": (
            {"model": str(folder / "dir.gguf")},
            f"model file {folder / 'dir.gguf'} for 'dir-model' is a directory, not a regular file",
        ),
        "fifo-mmproj": ({"args": ["--mmproj", str(fifo)]}, f"the --mmproj file {fifo} is a FIFO, not a regular file"),
        "cut": ({"model": str(cut)}, f"{cut}: the GGUF header is cut short (truncated file?)"),
    }
    if os.path.exists("/dev/zero"):
        models["device-model"] = (
            {"model": "/dev/zero"},
            "model file /dev/zero for 'device-model' is a character device, not a regular file",
        )
    for name, write, sentence in (
        ("layers-20000", lambda p: header(p, block_count=20000), f"llama.block_count is 20000; {should} 1 to 16384"),
        ("layers-text", lambda p: header(p, block_count="32"), f"llama.block_count is '32'; {should} 1 to 16384"),
        ("layers-nan", lambda p: header(p, block_count=math.nan), f"llama.block_count is nan; {should} 1 to 16384"),
        ("layers-inf", lambda p: header(p, block_count=math.inf), f"llama.block_count is inf; {should} 1 to 16384"),
        (
            "kv-heads-empty",
            lambda p: header(p, attention__head_count_kv=[]),
            f"llama.attention.head_count_kv is an empty array; {should} 0 to 65536, or an array of such numbers "
            "with one per layer (4)",
        ),
        (
            "pattern-text",
            lambda p: header(p, attention__sliding_window_pattern="every other"),
            f"llama.attention.sliding_window_pattern is 'every other'; {should} 0 to 16384 or an array of "
            "per-layer flags",
        ),
        ("version-99", lambda p: with_version(p, 99), "GGUF version 99 is not one llama.cpp reads (2 or 3)"),
        (
            "version-max",
            lambda p: with_version(p, 2**32 - 1),
            "GGUF version 4294967295 is not one llama.cpp reads (2 or 3)",
        ),
        (
            "endless-tensor",
            endless_tensor,
            f"tensor 'blk.0.attn_q.weight' claims {2**64 - 1} elements ({(2**64 - 1) * 4} bytes), more than the "
            "file's FILE_BYTES bytes",
        ),
    ):
        path = write(folder / f"{name}.gguf")
        models[name] = ({"model": str(path)}, f"{path}: " + sentence.replace("FILE_BYTES", str(path.stat().st_size)))
    return models


def test_hostile_files_are_one_sentence_through_the_api_with_the_daemon_answering(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon], tmp_path: Path
) -> None:
    models = hostile_models(tmp_path / "models")
    daemon = start_daemon(write_config({name: entry for name, (entry, _) in models.items()}))
    for name, (_, sentence) in models.items():
        planned = daemon.http.get(f"/plan/{name}")
        assert (planned.status_code, planned.json()["detail"]) == (422, sentence), name
        started = daemon.http.post(f"/instances/{name}/start")
        assert (started.status_code, started.json()["detail"]) == (422, sentence), name
        status = daemon.instance(name)
        assert (status["state"], status["last_error"]) == ("stopped", sentence), name
        assert daemon.http.get("/health").status_code == 200  # no autostart instance: all is well
    # and the daemon still stops (no thread or lock left holding it)
    assert daemon.stop() == 0


def test_cli_plan_up_and_doctor_print_the_sentence(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon], tmp_path: Path, marked_env: dict[str, str]
) -> None:
    models = hostile_models(tmp_path / "models")
    data_cut = write_tiny_llama(tmp_path / "data-cut.gguf")
    with data_cut.open("r+b") as f:  # a sound header, tensor data missing: an unfinished download
        f.truncate(data_cut.stat().st_size - 4096)
    entries = {name: entry for name, (entry, _) in models.items()} | {"data-cut": {"model": str(data_cut)}}
    config = write_config(entries)
    for name in ("fifo-mmproj", "layers-nan", "version-99"):  # here, without a daemon
        planned = run_cli("--config", str(config), "plan", name, env=marked_env)
        assert (planned.returncode, planned.stderr.splitlines()[0]) == (2, f"launcher: {models[name][1]}")
    doctor = run_cli("--config", str(config), "doctor", "--json", env=marked_env)
    assert doctor.returncode == 1 and "Traceback" not in doctor.stderr
    found = {(f["level"], f["check"], f["message"]) for f in json.loads(doctor.stdout)}
    for name, (entry, sentence) in models.items():
        if name.endswith("-model"):  # not opened at all: doctor says what the path is
            expected = f"models.{name}.model {entry['model']} {sentence.split(f'for {name!r} ')[1]}"
        else:
            expected = f"models.{name}: {sentence}"
        assert ("fail", "models", expected) in found, (name, sorted(found))
    size = data_cut.stat().st_size
    assert any(
        m.startswith(f"models.data-cut: model file {data_cut} is cut short: its tensor data ends at byte ")
        and m.endswith(f" but the file has {size} bytes")
        for _, _, m in found
    )

    daemon = start_daemon(config)
    for name in ("fifo-model", "kv-heads-empty", "endless-tensor"):  # through the daemon
        for verb in ("plan", "up"):
            result = daemon.cli(verb, name)
            assert (result.returncode, result.stderr.splitlines()[0]) == (2, f"launcher: {models[name][1]}"), verb
            assert "Traceback" not in result.stderr


def test_a_header_at_the_layer_limit_plans_and_concurrent_plans_leave_the_daemon_answering(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon], tmp_path: Path, standin: Path
) -> None:
    deep = header(tmp_path / "deep.gguf", block_count=16384)
    gpus = {"backend": "sim", "sim": [{"name": "Sim A", "memory_mib": 24576}, {"name": "Sim B", "memory_mib": 24576}]}
    daemon = start_daemon(write_config({"deep": {"model": str(deep), "binary": str(standin)}}, gpus=gpus))
    answers: list[int] = []

    def ask() -> None:
        answers.append(daemon.http.get("/plan/deep").status_code)

    askers = [threading.Thread(target=ask) for _ in range(7)]
    for asker in askers:
        asker.start()
    assert daemon.http.get("/health").status_code == 200
    for asker in askers:
        asker.join(60)
    assert answers == [200] * 7
    plan = daemon.http.get("/plan/deep").json()
    assert (plan["fits"], plan["gpu_layers"]) == (True, 16385)  # every layer and the output on the GPUs


async def test_identical_plans_share_one_computation() -> None:
    threads = PlanningThreads(limit=2)
    release, calls = threading.Event(), []

    def work() -> int:
        calls.append(1)
        release.wait(30)
        return 42

    waiting = [asyncio.ensure_future(threads.run(work, key="deep")) for _ in range(5)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*waiting) == [42] * 5
    assert calls == [1]


async def test_a_plan_whose_callers_left_before_its_turn_never_starts() -> None:
    threads = PlanningThreads(limit=1)
    release, began, ran = threading.Event(), threading.Event(), []

    def busy() -> str:
        began.set()
        release.wait(30)
        return "busy"

    def abandoned() -> str:
        ran.append("abandoned")
        return "abandoned"

    first = asyncio.ensure_future(threads.run(busy, key="a"))
    await asyncio.to_thread(began.wait, 30)
    queued = asyncio.ensure_future(threads.run(abandoned, key="b"))
    await asyncio.sleep(0)
    queued.cancel()  # its caller left (the API cancels a request whose client disconnected)
    with pytest.raises(asyncio.CancelledError):
        await queued
    release.set()
    assert await first == "busy"
    assert await threads.run(lambda: "next", key="b") == "next"  # the turn it would have taken is free
    assert ran == []


async def test_a_caller_that_comes_as_the_last_one_leaves_gets_its_own_plan() -> None:
    threads = PlanningThreads(limit=1)
    release, began = threading.Event(), threading.Event()

    def busy() -> str:
        began.set()
        release.wait(30)
        return "busy"

    first = asyncio.ensure_future(threads.run(busy, key="a"))
    await asyncio.to_thread(began.wait, 30)
    left = asyncio.ensure_future(threads.run(lambda: "m", key="m"))
    await asyncio.sleep(0)
    left.cancel()  # the last caller of "m" leaves before its turn: that computation is dropped...
    stays = asyncio.ensure_future(threads.run(lambda: "m again", key="m"))  # ...and one more comes at once
    await asyncio.sleep(0)
    release.set()
    assert await first == "busy"
    assert await stays == "m again"  # its own computation, never the dropped one's cancellation


async def test_a_plan_request_whose_client_left_is_cancelled_and_one_that_stays_is_answered() -> None:
    left = asyncio.Event()

    async def receive() -> dict[str, Any]:  # uvicorn's order: the (empty) body, then the disconnect
        if not received:
            received.append(1)
            return {"type": "http.request", "body": b"", "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    began = asyncio.Event()

    async def plan(seconds: float) -> str:
        began.set()
        await asyncio.sleep(seconds)
        return "plan"

    received: list[int] = []
    request = Request({"type": "http", "method": "GET", "path": "/plan/deep", "headers": []}, receive)
    assert await unless_gone(request, plan(0)) == "plan"
    received.clear()
    began.clear()
    waiting = asyncio.ensure_future(unless_gone(request, plan(60)))
    await began.wait()
    left.set()  # the client disconnects
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiting, 10)
