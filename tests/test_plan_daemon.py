"""Plans through the daemon and the CLI: `launcher plan`, /plan/{name}, instances planned against each
other's claims, a start refused with the numbers, and simulated memory that follows the plans."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import ConfigWriter, Daemon, run_cli

# GPUs so small that one tiny instance (512 MiB of driver overhead + a few MiB) fills each.
SMALL_GPUS = {
    "backend": "sim",
    "poll_interval": 0.1,
    "margin_mib": 0,
    "sim": [{"name": "Sim A", "memory_mib": 700}, {"name": "Sim B", "memory_mib": 700}],
}


def ready(status: dict[str, Any]) -> bool:
    return bool(status["state"] == "ready")


def gpu_used(daemon: Daemon) -> list[int]:
    return [g["memory_used_mib"] for g in daemon.http.get("/gpus").json()]


def wait_gpu_used(daemon: Daemon, expected: list[int]) -> None:
    deadline = time.monotonic() + 10
    while gpu_used(daemon) != expected:
        assert time.monotonic() < deadline, gpu_used(daemon)
        time.sleep(0.05)


def test_second_and_third_instances_plan_around_the_first(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon]
) -> None:
    daemon = start_daemon(write_config({"a": {}, "b": {}, "c": {}}, gpus=SMALL_GPUS))
    assert daemon.cli("up", "a").returncode == 0
    a = daemon.instance("a")
    assert a["gpus"] == [0] and a["vram_mib"] > 512
    assert a["plan"]["devices"][0]["total_mib"] == a["vram_mib"]  # the plan is recorded on the instance
    # `launcher plan` of a running instance shows the plan it runs with, not a new one beside itself.
    shown = json.loads(daemon.cli("plan", "a", "--json").stdout)
    assert shown["devices"] == a["plan"]["devices"]
    assert f"--port {a['port']}" in " ".join(shown["command"])
    wait_gpu_used(daemon, [a["vram_mib"], 0])  # the simulated card holds what the plan claims

    assert daemon.cli("up", "b").returncode == 0
    assert daemon.instance("b")["gpus"] == [1]  # not on the memory a holds
    refused = daemon.cli("up", "c")
    assert refused.returncode == 1
    assert "launcher: c needs " in refused.stderr
    assert re.search(r"but only \d+ MiB is usable there", refused.stderr)
    assert "Traceback" not in refused.stderr
    assert daemon.instance("c")["state"] == "stopped"

    assert daemon.cli("down", "a").returncode == 0
    wait_gpu_used(daemon, [0, daemon.instance("b")["vram_mib"]])  # a's memory is back
    assert daemon.cli("up", "c").returncode == 0
    assert daemon.instance("c")["gpus"] == [0]


def test_plan_command_and_endpoint(write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon]) -> None:
    daemon = start_daemon(write_config({"tiny": {"ctx": 2048}}, gpus=SMALL_GPUS))
    result = daemon.cli("plan", "tiny", "--json")
    assert result.returncode == 0
    plan = json.loads(result.stdout)
    for key in (
        "model",
        "backend",
        "fits",
        "reason",
        "suggestions",
        "devices",
        "host",
        "tensor_split",
        "command",
        "env",
    ):
        assert key in plan
    [device] = plan["devices"]
    for key in ("gpu", "uuid", "weights_mib", "kv_cache_mib", "compute_mib", "overhead_mib", "total_mib", "usable_mib"):
        assert key in device
    assert device["kv_cache_mib"] == 1  # 2048 cells x 4 layers x 2 heads x 32 x 2 bytes = 1 MiB
    assert plan["command"][plan["command"].index("--n-gpu-layers") + 1] == "5"
    assert plan["env"]["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert plan["host"]["weights_mib"] >= 1
    assert daemon.http.get("/plan/tiny").json()["devices"] == plan["devices"]
    assert daemon.http.get("/plan/nope").status_code == 404
    table = daemon.cli("plan", "tiny")
    assert table.stdout.startswith("tiny: fits on 1 GPU (ctx 2048")
    assert "--n-gpu-layers 5" in table.stdout


def test_plan_without_a_daemon_exits_1_when_it_does_not_fit(
    write_config: ConfigWriter, marked_env: dict[str, str]
) -> None:
    tiny_gpus = {**SMALL_GPUS, "sim": [{"name": "Sim C", "memory_mib": 300}]}
    config = write_config({"tiny": {}}, gpus=tiny_gpus)
    result = run_cli("--config", str(config), "plan", "tiny", env=marked_env)
    assert result.returncode == 1
    assert result.stdout.startswith("tiny: does not fit")
    assert re.search(r"tiny needs 5\d\d MiB on 1 GPU", result.stdout)
    # No way out to offer: 512 MiB of driver overhead alone exceeds the card, so no context, cache type,
    # number of such cards or partial offload fits, and ctx 256 is already the smallest context step.
    as_json = run_cli("--config", str(config), "plan", "tiny", "--json", env=marked_env)
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["suggestions"] == []
