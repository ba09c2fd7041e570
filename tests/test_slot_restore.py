"""Prompt caches that survive a planned stop, with a real llama-server: a long prompt, a stop (or a
restart), a start, and the same prompt is not computed again; a changed setting restores nothing; a save
that hangs does not hold the stop up."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from launcher.schema_instances import State
from launcher.supervise import slot_cache
from launcher.supervise.manager import Manager
from tests.conftest import ConfigWriter, OpenManager

READY_TIMEOUT_S = 60
# About 830 tokens of the tiny model's vocabulary.
LONG_PROMPT = " ".join(f"hello world {i}" for i in range(40))
SETTINGS = {"ctx": 2048}


def is_ready(instance: object) -> bool:
    return getattr(instance, "state", None) == State.READY


async def prompt_tokens_evaluated(manager: Manager, name: str) -> tuple[int, int]:
    """The long prompt sent to the instance's server: (tokens in the prompt, tokens it evaluated)."""
    port = manager.instances[name].port
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"http://127.0.0.1:{port}/completion", json={"prompt": LONG_PROMPT, "n_predict": 1}, timeout=60
        )
    answer: dict[str, Any] = response.json()
    return answer["tokens_evaluated"], answer["timings"]["prompt_n"]


async def start_ready(manager: Manager, name: str = "tiny") -> None:
    await manager.start(name)
    await manager.instances[name].wait_until(is_ready, READY_TIMEOUT_S)


def kv_events(manager: Manager, name: str = "tiny") -> list[str]:
    return [e.message for e in manager.instances[name].events if e.kind == "kv-cache"]


async def test_a_stop_and_a_restart_keep_the_prompt_cache(
    write_config: ConfigWriter, open_manager: OpenManager
) -> None:
    manager = await open_manager(write_config({"tiny": SETTINGS}))
    await start_ready(manager)
    total, evaluated = await prompt_tokens_evaluated(manager, "tiny")
    assert total > 500 and evaluated > total * 0.95  # the first time, all of it

    await manager.stop("tiny")
    assert any(m.startswith("prompt cache saved: 1 slots") for m in kv_events(manager)), kv_events(manager)
    await start_ready(manager)
    assert any(m.startswith("prompt cache restored") for m in kv_events(manager)), kv_events(manager)
    _, evaluated = await prompt_tokens_evaluated(manager, "tiny")
    assert evaluated < total * 0.05

    await manager.restart("tiny")
    await manager.instances["tiny"].wait_until(is_ready, READY_TIMEOUT_S)
    _, evaluated = await prompt_tokens_evaluated(manager, "tiny")
    assert evaluated < total * 0.05


async def test_a_changed_setting_restores_nothing(write_config: ConfigWriter, open_manager: OpenManager) -> None:
    manager = await open_manager(write_config({"tiny": SETTINGS}))
    await start_ready(manager)
    total, _ = await prompt_tokens_evaluated(manager, "tiny")
    await manager.stop("tiny")
    instance = manager.instances["tiny"]
    instance.reconfigure(instance.settings.model_copy(update={"ctx": 1536}), instance.backend)
    await start_ready(manager)
    assert not any(m.startswith("prompt cache restored") for m in kv_events(manager))
    _, evaluated = await prompt_tokens_evaluated(manager, "tiny")
    assert evaluated > total * 0.95


async def test_a_setting_changed_through_the_environment_restores_nothing(
    write_config: ConfigWriter, open_manager: OpenManager
) -> None:
    """llama-server reads its arguments from `LLAMA_ARG_*` variables too: another RoPE base given so is
    another cache (its keys rotated otherwise), though the command line is the same."""
    manager = await open_manager(write_config({"tiny": SETTINGS}))
    await start_ready(manager)
    await prompt_tokens_evaluated(manager, "tiny")
    await manager.stop("tiny")
    instance = manager.instances["tiny"]
    rope = {"LLAMA_ARG_ROPE_FREQ_BASE": "20000"}
    instance.reconfigure(instance.settings.model_copy(update={"env": rope}), instance.backend)
    await start_ready(manager)
    assert not any(m.startswith("prompt cache restored") for m in kv_events(manager)), kv_events(manager)


async def test_a_cache_file_that_kills_its_server_is_tried_once(
    write_config: ConfigWriter, open_manager: OpenManager
) -> None:
    """A slot file cut to a third: llama-server aborts reading it (a file cut shorter gets a 400). The
    restart that follows restores nothing and serves (before, each restart restored it again and died)."""
    manager = await open_manager(write_config({"tiny": SETTINGS}))
    await start_ready(manager)
    total, _ = await prompt_tokens_evaluated(manager, "tiny")
    await manager.stop("tiny")
    argv = (manager.instances["tiny"].spec or pytest.fail("no command")).argv
    saved = list(Path(argv[argv.index(slot_cache.SAVE_PATH_FLAG) + 1]).glob(f"*{slot_cache.SLOT_FILE_SUFFIX}"))
    assert len(saved) == 1
    saved[0].write_bytes(saved[0].read_bytes()[: saved[0].stat().st_size // 3])
    await manager.start("tiny")
    instance = manager.instances["tiny"]
    await instance.wait_until(lambda i: i.state == State.READY and i.restarts >= 1, READY_TIMEOUT_S)
    _, evaluated = await prompt_tokens_evaluated(manager, "tiny")
    assert evaluated > total * 0.95
    failed = [m for m in kv_events(manager) if m.startswith("prompt cache not restored")]
    assert len(failed) == 1 and failed[0].endswith("(it is deleted)"), kv_events(manager)
    assert not saved[0].exists()
    # Never shown ready while dead: the server the restore killed went from loading to its exit.
    told = [(e.kind, e.message) for e in instance.events]
    after = told[told.index(("kv-cache", failed[0])) + 1]
    assert after[0] == "exit" and "SIGABRT" in after[1], told


async def test_a_model_that_keeps_no_cache_gets_no_save_path(
    write_config: ConfigWriter, open_manager: OpenManager
) -> None:
    manager = await open_manager(write_config({"tiny": {**SETTINGS, "kv_cache_max_gib": 0}}))
    await start_ready(manager)
    assert "--slot-save-path" not in (manager.instances["tiny"].spec or pytest.fail("no command")).argv
    await manager.stop("tiny")
    assert kv_events(manager) == []


async def test_a_save_that_hangs_does_not_hold_the_stop_past_its_timeout(
    write_config: ConfigWriter, open_manager: OpenManager, standin: Path
) -> None:
    stop_timeout_s = 1.0
    entry = {"binary": str(standin), "stop_timeout": stop_timeout_s, "env": {"STANDIN_HANG_SLOTS": "1"}}
    manager = await open_manager(write_config({"tiny": entry}))
    await start_ready(manager)
    began = time.monotonic()
    await manager.stop("tiny")
    assert time.monotonic() - began < stop_timeout_s
    assert any("took over" in m for m in kv_events(manager)), kv_events(manager)
