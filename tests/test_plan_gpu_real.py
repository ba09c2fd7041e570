"""What the GPU reading says a real llama-server's process holds, against nvidia-smi, and the driver's share
learned from it (issue 23), on a machine with an NVIDIA GPU and a llama-server built for CUDA. Skipped,
saying why, elsewhere."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pynvml
import pytest

from launcher.backends.llama_server import find_llama_server
from tests.conftest import ConfigWriter, Daemon


def _cuda_or_skip() -> str:
    """nvidia-smi's path, once NVML opens and llama-server lists a CUDA device."""
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
    except pynvml.NVMLError as exc:
        pytest.skip(f"no NVIDIA driver (NVML cannot initialise): {exc}")
    smi = shutil.which("nvidia-smi")
    if smi is None:
        pytest.skip("no nvidia-smi on PATH to compare with")
    listed = subprocess.run(
        [str(find_llama_server(None)), "--list-devices"], capture_output=True, text=True, timeout=60, check=False
    )
    if "CUDA0" not in listed.stdout + listed.stderr:
        pytest.skip("the llama-server here is not built for CUDA")
    return smi


def test_a_cuda_servers_process_memory_is_nvidia_smis_and_teaches_the_drivers_share(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon], tmp_path: Path
) -> None:
    smi = _cuda_or_skip()
    daemon = start_daemon(write_config({"tiny": {"gpus": [0], "ctx": 4096}}, gpus={"backend": "nvml"}))
    assert daemon.http.post("/instances/tiny/start").status_code == 202
    tiny = daemon.wait_for("tiny", lambda i: i["state"] == "ready" and i["actual"] is not None)
    gpu = tiny["actual"]["devices"][0]
    assert (gpu["device"], gpu["seen"]) == ("CUDA0", True)
    query = [smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
    rows = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()
    used = {int(pid): int(mib) for pid, mib in (row.split(",") for row in rows if row.strip())}
    if tiny["pid"] not in used:
        pytest.skip("nvidia-smi shows no memory per process here (a container or MIG hides it)")
    # Both read NVML; the server allocates nothing more once ready: the same MiB, give or take rounding.
    assert gpu["process_mib"] is not None and abs(gpu["process_mib"] - used[tiny["pid"]]) <= 2

    buffers = sum(term["actual_mib"] for term in gpu["terms"].values())
    stored = json.loads((tmp_path / "state" / "measured.json").read_text())["overheads_mib"]
    [(key, share)] = stored.items()
    assert share == max(0, math.ceil(gpu["process_mib"] - buffers))
    gpu_name = daemon.http.get("/gpus").json()[0]["name"]
    assert key.startswith(f"{gpu_name}|")

    assert daemon.http.post("/instances/tiny/stop").status_code == 202
    daemon.wait_for("tiny", lambda i: i["state"] == "stopped")
    plan = daemon.http.get("/plan/tiny").json()
    assert plan["devices"][0]["overhead_mib"] == share and plan["measured"] is not None
