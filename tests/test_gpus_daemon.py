"""GPUs through the daemon: the instance <-> GPU mapping, device identity in the child's environment,
`launcher gpus` and history, on simulated GPUs with real llama-servers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ConfigWriter, Daemon, stop_process

SIM: list[dict[str, Any]] = [
    {"name": "Sim 3090", "memory_mib": 24576, "uuid": "GPU-aaaaaaaa-0000-4000-8000-000000000000"},
    {"name": "Sim 4080", "memory_mib": 16384, "uuid": "GPU-bbbbbbbb-0000-4000-8000-000000000000", "used_mib": 512},
]


def ready(status: dict[str, Any]) -> bool:
    return bool(status["state"] == "ready")


def test_instances_sit_on_their_gpus_named_by_uuid(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon]
) -> None:
    config = write_config(
        {"tiny": {"autostart": True, "gpus": [1]}},
        gpus={"backend": "sim", "poll_interval": 0.1, "sim": SIM},
    )
    daemon = start_daemon(config)
    status = daemon.wait_for("tiny", ready)
    assert status["gpus"] == [1]
    env = psutil.Process(status["pid"]).environ()
    assert env["CUDA_VISIBLE_DEVICES"] == SIM[1]["uuid"]
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert "--n-gpu-layers" in psutil.Process(status["pid"]).cmdline()

    gpus = daemon.http.get("/gpus").json()
    assert [(g["index"], g["instances"]) for g in gpus] == [(0, []), (1, ["tiny"])]

    table = daemon.cli("gpus")
    assert table.returncode == 0
    assert "Sim 4080" in table.stdout and "tiny" in table.stdout.splitlines()[2]
    as_json = json.loads(daemon.cli("gpus", "--json").stdout)
    for key in (
        "index", "uuid", "name", "pci_bus_id", "memory_total_mib", "memory_used_mib", "memory_free_mib",
        "temperature_c", "utilization_pct", "power_w", "instances", "error",
    ):  # fmt: skip
        assert key in as_json[1]
    # The simulated GPU's memory holds the foreign 512 MiB plus what the instance's plan takes.
    planned = daemon.instance("tiny")["vram_mib"]
    assert planned > 512  # the driver overhead alone is 512 MiB
    assert (as_json[1]["memory_used_mib"], as_json[1]["memory_free_mib"]) == (512 + planned, 16384 - 512 - planned)
    assert as_json[0]["memory_used_mib"] == 0

    history = daemon.http.get("/gpus/0/history").json()
    assert history and all(h["index"] == 0 for h in history)
    assert daemon.http.get("/gpus/7/history").status_code == 404
    assert "1" in daemon.cli("status").stdout.splitlines()[1].split()  # the GPUS column


def test_unknown_gpu_in_config_is_refused_with_the_gpus_seen(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon]
) -> None:
    daemon = start_daemon(write_config({"tiny": {"gpus": ["GPU-nope"]}}, gpus={"backend": "sim", "sim": SIM}))
    result = daemon.cli("up", "tiny")
    assert result.returncode == 2
    assert "models.tiny.gpus names GPU 'GPU-nope', which is not there" in result.stderr
    assert SIM[0]["uuid"] in result.stderr


def test_gpus_watch_redraws_until_interrupted(write_config: ConfigWriter, marked_env: dict[str, str]) -> None:
    config = write_config(gpus={"backend": "sim", "poll_interval": 0.1, "sim": SIM})
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "--config", str(config), "gpus", "--watch"],
        env=marked_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        # As a terminal's Ctrl-C finds it: a runner started in the background of a shell without job control
        # ignores SIGINT, and a child inherits that (CI hung here for 30 s so, the watch never interrupted).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    redraws = 0
    for line in proc.stdout:
        if line.startswith("\x1b[H\x1b[2JGPU"):
            redraws += 1
            if redraws == 3:
                break
    assert stop_process(proc, signal.SIGINT) == 130
    proc.stdout.close()


def test_metrics_for_instances_and_gpus(write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon]) -> None:
    config = write_config({"tiny": {"autostart": True, "gpus": [1]}}, gpus={"backend": "sim", "sim": SIM})
    daemon = start_daemon(config)
    status = daemon.wait_for("tiny", ready)
    response = daemon.http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
    who = (("backend", "llama-server"), ("group", "tiny"), ("instance", "tiny"))
    assert samples[("launcher_instance_ready", who)] == 1
    assert samples[("launcher_instance_state", tuple(sorted((*who, ("state", "ready")))))] == 1
    assert samples[("launcher_instance_restarts_total", who)] == 0
    assert samples[("launcher_instance_vram_planned_bytes", who)] == status["vram_mib"] * 2**20
    assert samples[("launcher_instance_split_mode", tuple(sorted((*who, ("mode", "layer")))))] == 1  # one GPU
    gpu1 = (("UUID", SIM[1]["uuid"]), ("gpu", "1"), ("modelName", "Sim 4080"), ("pci_bus_id", "00000000:02:00.0"))
    assert samples[("launcher_gpu_memory_total_bytes", gpu1)] == 16384 * 2**20
    assert samples[("launcher_gpu_temperature_celsius", gpu1)] == 40
    assert samples[("launcher_gpu_up", gpu1)] == 1
