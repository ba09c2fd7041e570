"""The supervision core with a real llama-server, in process: ready, completion, restart, crash, stop."""

from __future__ import annotations

import os
import shutil
import signal
from collections import Counter
from pathlib import Path

import httpx
import psutil
import pytest

from launcher.backends.llama_server import LlamaServerBackend
from launcher.errors import ConfigError, ConflictError, StartError
from launcher.schema_instances import State
from launcher.supervise import instance as instance_module
from launcher.supervise.manager import Manager
from launcher.tinymodel import write_tiny_llama
from tests.conftest import ConfigWriter, OpenManager, free_port

READY_TIMEOUT_S = 60


@pytest.fixture
async def manager(write_config: ConfigWriter, open_manager: OpenManager) -> Manager:
    return await open_manager(write_config())


def is_ready(instance: object) -> bool:
    return getattr(instance, "state", None) == State.READY


async def test_start_ready_complete_restart_stop(manager: Manager) -> None:
    instance = manager.get("tiny")
    await manager.start("tiny")
    await instance.wait_until(is_ready, READY_TIMEOUT_S)
    first = instance.status()
    assert first.pid is not None
    assert first.port is not None

    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"http://127.0.0.1:{first.port}/completion", json={"prompt": "Hello", "n_predict": 4}, timeout=30
        )
    assert response.status_code == 200
    assert response.json()["tokens_predicted"] > 0

    await manager.restart("tiny")
    await instance.wait_until(is_ready, READY_TIMEOUT_S)
    second = instance.status()
    assert second.pid not in (None, first.pid)
    assert not psutil.pid_exists(first.pid)

    await manager.stop("tiny")
    assert instance.state == State.STOPPED
    assert second.pid is not None
    assert not psutil.pid_exists(second.pid)


async def test_kill_9_is_noticed_and_restarted(manager: Manager) -> None:
    instance = manager.get("tiny")
    await manager.start("tiny")
    await instance.wait_until(is_ready, READY_TIMEOUT_S)
    old_pid = instance.status().pid
    assert old_pid is not None

    os.kill(old_pid, signal.SIGKILL)
    await instance.wait_until(lambda i: i.restarts == 1 and is_ready(i), READY_TIMEOUT_S)

    status = instance.status()
    assert status.pid not in (None, old_pid)
    assert status.last_exit == "killed by SIGKILL"
    assert status.last_exit_signal == signal.SIGKILL
    kinds = [e.kind for e in status.events]
    assert "exit" in kinds


def _count_calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, calls: Counter[str]) -> None:
    """Count the calls of ``owner.name`` (a method of a class, or a function of a module) in ``calls``."""
    real = getattr(owner, name)

    def counted(*args: object, **kwargs: object) -> object:
        calls[name] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)


async def test_one_start_computes_its_command_once(
    write_config: ConfigWriter, open_manager: OpenManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start is the start of one server process: one asked for (start, restart) or one the restart
    policy makes after a crash. Each checks the model file and the port, and computes the command
    (launch_spec, which looks the binary up) once; `GET /plan` of the running instance shows that command."""
    fast = {"policy": "on-failure", "backoff_initial": 0.01, "backoff_max": 0.05, "burst": 100, "interval": 60}
    manager = await open_manager(write_config({"tiny": {"restart": fast}}))
    calls: Counter[str] = Counter()
    for name in ("launch_spec", "binary", "check_model"):
        _count_calls(monkeypatch, LlamaServerBackend, name, calls)
    _count_calls(monkeypatch, instance_module, "ensure_port_free", calls)
    instance = manager.get("tiny")

    await manager.start("tiny")
    await instance.wait_until(is_ready, READY_TIMEOUT_S)
    # The model file: checked by the planner and before the spawn.
    # The binary: looked up by the planner too (the server's identity keys what earlier runs measured).
    assert calls == {"launch_spec": 1, "binary": 2, "check_model": 2, "ensure_port_free": 1}
    plan = await manager.plan("tiny")
    assert instance.spec is not None and plan.command == instance.spec.argv
    assert calls["launch_spec"] == 1

    pid = instance.status().pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # the policy starts a new process: checked and computed again
    await instance.wait_until(lambda i: i.restarts == 1 and is_ready(i), READY_TIMEOUT_S)
    assert calls == {"launch_spec": 2, "binary": 3, "check_model": 3, "ensure_port_free": 2}

    calls.clear()
    await manager.restart("tiny")
    await instance.wait_until(is_ready, READY_TIMEOUT_S)
    # Before the stop, what would keep the server from coming back (model file, binary) is checked;
    # the port is its own until then.
    assert calls == {"launch_spec": 1, "binary": 3, "check_model": 3, "ensure_port_free": 1}


async def test_the_plan_of_an_instance_between_runs_is_what_its_next_run_gets(
    write_config: ConfigWriter, open_manager: OpenManager, standin: Path, tmp_path: Path
) -> None:
    """`GET /plan` of an instance in backoff shows the command its next run gets, or why there is none: a
    binary removed after its server crashed is said, not hidden behind the last run's command."""
    binary = tmp_path / "server"
    shutil.copy(standin, binary)  # with its mode: executable
    slow = {"policy": "on-failure", "backoff_initial": 60, "backoff_max": 60, "burst": 100, "interval": 60}
    manager = await open_manager(write_config({"tiny": {"binary": str(binary), "restart": slow}}))
    instance = manager.get("tiny")
    await manager.start("tiny")
    await instance.wait_until(is_ready, READY_TIMEOUT_S)
    ran_with = (await manager.plan("tiny")).command
    pid = instance.status().pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await instance.wait_until(lambda i: i.state == State.BACKOFF, READY_TIMEOUT_S)
    assert (await manager.plan("tiny")).command == ran_with
    binary.unlink()
    with pytest.raises(ConfigError, match=r"server does not exist or is not executable"):
        await manager.plan("tiny")


async def test_log_has_markers_and_server_output(manager: Manager) -> None:
    instance = manager.get("tiny")
    await manager.start("tiny")
    await instance.wait_until(is_ready, READY_TIMEOUT_S)
    await manager.stop("tiny")
    text = instance.log_path.read_text()
    assert "=== launcher" in text
    assert "starting tiny" in text
    assert "server: listening on http://127.0.0.1:" in text  # llama-server's own output is captured
    assert "tiny exited with code 0 (stopped on request)" in text


async def test_conflicts(manager: Manager) -> None:
    with pytest.raises(ConflictError, match="not running"):
        await manager.stop("tiny")
    await manager.start("tiny")
    with pytest.raises(ConflictError, match="already"):
        await manager.start("tiny")


async def test_missing_model_file_is_refused_before_spawning(
    write_config: ConfigWriter, open_manager: OpenManager, tmp_path: Path
) -> None:
    manager = await open_manager(write_config({"tiny": {"model": str(tmp_path / "absent.gguf")}}))
    with pytest.raises(ConfigError, match=r"absent\.gguf .* does not exist"):
        await manager.start("tiny")
    assert manager.get("tiny").state == State.STOPPED


async def test_port_in_use_names_the_holder(write_config: ConfigWriter, open_manager: OpenManager) -> None:
    import socket

    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        manager = await open_manager(write_config({"tiny": {"port": port}}))
        with pytest.raises(StartError, match=f"port {port} is already in use by .*pid {os.getpid()}"):
            await manager.start("tiny")


async def test_a_model_file_the_server_rejects_fails_at_once_with_its_words(
    write_config: ConfigWriter, open_manager: OpenManager, tmp_path: Path
) -> None:
    broken = write_tiny_llama(tmp_path / "broken.gguf")
    with broken.open("r+b") as f:  # a sound header, but tensor data missing: llama-server exits at load
        f.truncate(broken.stat().st_size - 4096)
    restart = {"policy": "on-failure", "backoff_initial": 0.05, "backoff_max": 0.2, "burst": 2, "interval": 60}
    manager = await open_manager(write_config({"tiny": {"model": str(broken), "restart": restart}}))
    instance = manager.get("tiny")
    await manager.start("tiny")
    await instance.wait_until(lambda i: i.state == State.FAILED, READY_TIMEOUT_S)
    status = instance.status()
    # The same error at two starts in a row, nothing changed: failed at once, not after the burst.
    assert status.restarts == 1
    assert status.last_exit is not None
    assert status.last_exit != "killed by SIGTERM"
    assert status.last_error is not None
    assert "failed to load model" in status.last_error  # llama-server's own words
    assert status.last_error in status.events[-1].message or any(
        status.last_error in e.message for e in status.events if e.kind == "exit"
    )
    assert any("failed to load model" in line for line in status.log_tail)
    backoffs = [e.message for e in status.events if e.state == State.BACKOFF and e.kind == "state"]
    assert backoffs == ["restarting in 0.05s"]
    assert status.events[-1].message == "it failed to start twice in a row with the same error: not retried"
