"""The Ollama backend against a stand-in `ollama serve` that records how it was run: the exact environment
for one GPU, a spread over two, per-GPU replicas on four, AMD cards and a user override; ready only once the
model is loaded; a model Ollama drops is reloaded, not counted as a crash; sizes and the CPU-fallback
warning; planning from the model's blob in the Ollama store."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from launcher.errors import ConfigError
from launcher.schema_instances import State
from launcher.supervise.instance import Instance
from launcher.supervise.manager import Manager
from launcher.tinymodel import write_tiny_llama
from tests.conftest import ConfigWriter, Daemon, OpenManager, free_port, free_port_run

UUIDS = [f"GPU-{i}{i}{i}{i}aaaa-0000-4000-8000-00000000000{i}" for i in range(4)]
PREFIXES = ("OLLAMA_", "CUDA_", "ROCR_", "HIP_")


def sim_gpus(count: int, vendor: str = "nvidia", memory_mib: int = 24576) -> dict[str, Any]:
    gpus = [{"name": f"Sim {i}", "memory_mib": memory_mib, "uuid": UUIDS[i], "vendor": vendor} for i in range(count)]
    return {"backend": "sim", "poll_interval": 0.1, "sim": gpus}


def ollama_model(binary: Path, records: Path, **over: Any) -> dict[str, Any]:
    model: dict[str, Any] = {
        "backend": "ollama",
        "model": "qwen2.5:7b",
        "binary": str(binary),
        "ctx": 8192,
        "ollama": {"size_mib": 1000},
        "env": {"STANDIN_RECORD_DIR": str(records)},
        "health": {"interval": 0.2, "timeout": 1, "failures": 3},
    }
    for key, value in over.items():
        model[key] = {**model[key], **value} if isinstance(value, dict) and key in model else value
    return model


def recorded(records: Path, port: int) -> dict[str, str]:
    env: dict[str, str] = json.loads((records / f"{port}.json").read_text())["env"]
    return {k: v for k, v in env.items() if k.startswith(PREFIXES)}


async def start_ready(manager: Manager, name: str) -> Instance:
    await manager.start(name)
    instance = manager.get(name)
    await instance.wait_until(lambda i: i.state in (State.READY, State.FAILED), 30)
    assert instance.state == State.READY, instance.status(events=20)
    return instance


def base_env(port: int, spread: str, **extra: str) -> dict[str, str]:
    return {
        "OLLAMA_HOST": f"127.0.0.1:{port}",
        "OLLAMA_SCHED_SPREAD": spread,
        "OLLAMA_KEEP_ALIVE": "-1",
        "OLLAMA_CONTEXT_LENGTH": "8192",
        **extra,
    }


async def test_one_gpu(
    write_config: ConfigWriter, open_manager: OpenManager, ollama_standin: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")  # the daemon's, never the child's
    config = write_config({"chat": ollama_model(ollama_standin, tmp_path)}, gpus=sim_gpus(2))
    instance = await start_ready(await open_manager(config), "chat")
    assert instance.port is not None
    env = recorded(tmp_path, instance.port)
    assert env == base_env(instance.port, "0", CUDA_VISIBLE_DEVICES=UUIDS[0], CUDA_DEVICE_ORDER="PCI_BUS_ID")
    child = json.loads((tmp_path / f"{instance.port}.json").read_text())
    assert child["argv"] == ["serve"]
    assert "NOTIFY_SOCKET" not in child["env"]


async def test_spread_over_two(
    write_config: ConfigWriter, open_manager: OpenManager, ollama_standin: Path, tmp_path: Path
) -> None:
    big = ollama_model(ollama_standin, tmp_path, ollama={"size_mib": 30000})
    instance = await start_ready(await open_manager(write_config({"big": big}, gpus=sim_gpus(2))), "big")
    assert instance.port is not None
    env = recorded(tmp_path, instance.port)
    expected = base_env(instance.port, "1", CUDA_VISIBLE_DEVICES=",".join(UUIDS[:2]), CUDA_DEVICE_ORDER="PCI_BUS_ID")
    assert env == expected
    assert instance.status().gpus == [0, 1]


async def test_amd_cards_and_a_user_override(
    write_config: ConfigWriter, open_manager: OpenManager, ollama_standin: Path, tmp_path: Path
) -> None:
    model = ollama_model(
        ollama_standin,
        tmp_path,
        env={"OLLAMA_KEEP_ALIVE": "10m", "OLLAMA_NUM_PARALLEL": "8"},
        ollama={"num_parallel": 2, "flash_attention": True, "kv_cache_type": "q8_0", "gpu_overhead_mib": 256},
    )
    instance = await start_ready(await open_manager(write_config({"chat": model}, gpus=sim_gpus(2, "amd"))), "chat")
    assert instance.port is not None
    env = recorded(tmp_path, instance.port)
    assert env == base_env(
        instance.port,
        "0",
        ROCR_VISIBLE_DEVICES=UUIDS[0],
        HIP_VISIBLE_DEVICES="0",
        OLLAMA_KEEP_ALIVE="10m",  # the user's env wins over the launcher's default
        OLLAMA_NUM_PARALLEL="8",  # ... and over the ollama: settings
        OLLAMA_FLASH_ATTENTION="1",
        OLLAMA_KV_CACHE_TYPE="q8_0",
        OLLAMA_GPU_OVERHEAD=str(256 * 1024 * 1024),
    )


async def test_ready_means_loaded_with_sizes_and_a_cpu_fallback_warning(
    write_config: ConfigWriter, open_manager: OpenManager, ollama_standin: Path, tmp_path: Path
) -> None:
    # The stand-in's GPU holds 600 MiB of the 1000 MiB model: Ollama would put the rest on the CPU.
    env = {"STANDIN_LOAD_S": "0.5", "STANDIN_GPU_MIB": "600"}
    model = ollama_model(ollama_standin, tmp_path, env=env)
    manager = await open_manager(write_config({"chat": model}, gpus=sim_gpus(1)))
    instance = await start_ready(manager, "chat")
    states = [e.state for e in instance.events if e.kind == "state"]
    assert states.index(State.LOADING) < states.index(State.READY)
    await instance.wait_until(lambda i: bool(i.server_info), 10)
    assert instance.server_info == {"size_bytes": 1000 * 2**20, "size_vram_bytes": 600 * 2**20}
    warnings = [e.message for e in instance.events if e.kind == "warning"]
    assert warnings == ["only 600 of 1000 MiB of qwen2.5:7b are on the GPUs: the rest runs on the CPU, much slower"]


async def test_a_dropped_model_is_reloaded_not_restarted(
    write_config: ConfigWriter, open_manager: OpenManager, ollama_standin: Path, tmp_path: Path
) -> None:
    # Late enough to come after ready even on a loaded machine: a drop while loading is just a longer load.
    model = ollama_model(ollama_standin, tmp_path, env={"STANDIN_DROP_AFTER_S": "1.5"})
    manager = await open_manager(write_config({"chat": model}, gpus=sim_gpus(1)))
    instance = await start_ready(manager, "chat")
    pid = instance.status().pid
    await instance.wait_until(lambda i: any(e.kind == "warning" for e in i.events), 10)
    assert next(e.message for e in instance.events if e.kind == "warning") == (
        "the server dropped the model; loading it again"
    )
    await instance.wait_until(lambda i: bool(i.server_info), 10)  # loaded again: sizes reported
    assert (instance.state, instance.restarts, instance.status().pid) == (State.READY, 0, pid)


async def test_a_crash_is_restarted(
    write_config: ConfigWriter, open_manager: OpenManager, ollama_standin: Path, tmp_path: Path
) -> None:
    restart = {"backoff_initial": 0.05, "backoff_max": 0.1, "burst": 10}
    model = ollama_model(ollama_standin, tmp_path, env={"STANDIN_CRASH_AFTER_S": "0.5"}, restart=restart)
    manager = await open_manager(write_config({"chat": model}, gpus=sim_gpus(1)))
    instance = await start_ready(manager, "chat")
    await instance.wait_until(lambda i: i.restarts >= 1 and i.state == State.READY, 30)
    assert instance.status().last_exit == "exited with code 3"


async def test_a_hung_server_is_replaced(
    write_config: ConfigWriter, open_manager: OpenManager, ollama_standin: Path, tmp_path: Path
) -> None:
    restart = {"backoff_initial": 0.05, "backoff_max": 0.1, "burst": 10}
    model = ollama_model(ollama_standin, tmp_path, env={"STANDIN_HANG_AFTER_S": "1.5"}, restart=restart)
    model["health"] = {"interval": 0.2, "timeout": 0.3, "failures": 2}
    model["stop_timeout"] = 1
    manager = await open_manager(write_config({"chat": model}, gpus=sim_gpus(1)))
    instance = await start_ready(manager, "chat")
    first = instance.status().pid
    await instance.wait_until(lambda i: i.restarts >= 1 and i.state == State.READY, 30)
    assert instance.status().pid != first
    assert instance.status().last_error == "killed after 2 failed health checks"


async def test_planning_reads_the_blob_in_the_ollama_store(
    write_config: ConfigWriter, open_manager: OpenManager, ollama_standin: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    digest = "sha256-" + "ab" * 32
    write_tiny_llama(store / "blobs" / digest)
    manifest = store / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "latest"
    manifest.parent.mkdir(parents=True)
    layers = [{"mediaType": "application/vnd.ollama.image.model", "digest": digest.replace("-", ":")}]
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))
    model = ollama_model(ollama_standin, tmp_path, model="tiny", ollama={"size_mib": None, "models_dir": str(store)})
    manager = await open_manager(write_config({"tiny": model}, gpus=sim_gpus(1)))
    plan = await manager.plan("tiny")
    assert plan.fits
    assert plan.devices[0].layers == 4  # the real shape of the blob, not a size
    assert plan.env["OLLAMA_MODELS"] == str(store)
    closed = f"http://127.0.0.1:{free_port()}"  # a registry that cannot be reached
    missing = ollama_model(
        ollama_standin,
        tmp_path,
        model="nope:1b",
        ollama={"size_mib": None, "models_dir": str(store), "registry": closed},
    )
    other_state = {"state_dir": str(tmp_path / "state-2")}  # a second daemon owns a state directory of its own
    manager = await open_manager(write_config({"nope": missing}, gpus=sim_gpus(1), daemon=other_state))
    with pytest.raises(
        ConfigError, match=rf"^the Ollama registry at {closed} cannot be reached to plan nope:1b before"
    ):
        await manager.plan("nope")


def test_per_gpu_replicas_on_four(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon], ollama_standin: Path, tmp_path: Path
) -> None:
    port = free_port_run(4)
    model = ollama_model(ollama_standin, tmp_path, replicas="per-gpu", port=port)
    daemon = start_daemon(write_config({"chat": model}, gpus=sim_gpus(4)))
    up = daemon.cli("up", "chat")  # the model's name stands for its replicas
    assert up.returncode == 0, up.stderr
    assert f"try: curl -s {daemon.url}/v1/chat/completions" in up.stdout and '"model": "chat"' in up.stdout
    statuses = {s["name"]: s for s in daemon.http.get("/instances").json()}
    assert sorted(statuses) == ["chat@0", "chat@1", "chat@2", "chat@3"]
    for i in range(4):
        status = statuses[f"chat@{i}"]
        assert (status["group"], status["state"], status["port"], status["gpus"]) == ("chat", "ready", port + i, [i])
        env = recorded(tmp_path, port + i)
        assert env == base_env(port + i, "0", CUDA_VISIBLE_DEVICES=UUIDS[i], CUDA_DEVICE_ORDER="PCI_BUS_ID")
    assert daemon.http.post("/instances/chat/start").status_code == 404  # act on replicas, named
    rolled = daemon.http.post("/instances/chat/restart")  # but a restart rolls them, one at a time
    assert rolled.status_code == 200 and rolled.json()["restarted"] == ["chat@0", "chat@1", "chat@2", "chat@3"]
    assert daemon.cli("down", "chat").returncode == 0
    assert {s["state"] for s in daemon.http.get("/instances").json()} == {"stopped"}
