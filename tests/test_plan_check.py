"""A ready llama-server's plan against what it reports allocating (issue 23), through a real daemon on the
CPU: read once it is ready, shown by `GET /instances/NAME` and `launcher status NAME`, gone once it stops;
a server that logs no buffer sizes (below -lv 4) is no check, and says how to get one. The split over two
RPC devices is tests/test_rpc_peers.py's three-daemon test."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.conftest import ConfigWriter, Daemon


def test_a_ready_server_is_checked_against_its_plan_once_and_a_quiet_one_says_why_not(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon]
) -> None:
    daemon = start_daemon(write_config({"told": {}, "quiet": {"args": ["-lv", "3"]}}))
    before = daemon.instance("told")
    assert (before["actual"], before["actual_missing"]) == (None, None)  # nothing runs: nothing to check
    for name in ("told", "quiet"):
        assert daemon.http.post(f"/instances/{name}/start").status_code == 202
    told = daemon.wait_for("told", lambda i: i["state"] == "ready" and i["actual"] is not None)
    plan, check = told["plan"], told["actual"]
    # On the CPU: no device, the host alone, its planned terms the plan's and its actual ones the log's.
    [host] = check["devices"]
    assert (host["device"], host["seen"], host["gpu"]) == ("CPU", True, None)
    log = Path(told["log_path"]).read_text()
    mapped = [float(line.split("=")[1].split()[0]) for line in log.splitlines() if "CPU_Mapped model buffer" in line]
    assert mapped and host["terms"]["weights"]["actual_mib"] == round(sum(mapped), 2)
    assert host["terms"]["weights"]["planned_mib"] == plan["host"]["weights_mib"]
    assert host["terms"]["kv"]["planned_mib"] == plan["host"]["kv_cache_mib"]
    assert host["terms"]["kv"]["actual_mib"] > 0 and host["terms"]["compute"]["actual_mib"] > 0
    assert check["unmatched"] == []
    table = daemon.cli("status", "told")
    assert table.returncode == 0 and "planned against actual (llama-server's load log), MiB:" in table.stdout
    assert ["CPU", "weights", f"{host['terms']['weights']['planned_mib']:g}"] in [
        line.split()[:3] for line in table.stdout.splitlines()
    ]

    quiet = daemon.wait_for("quiet", lambda i: i["state"] == "ready" and i["actual_missing"] is not None)
    why = "llama-server logged no buffer sizes (it does from -lv 4: the model's args set a lower verbosity)"
    assert (quiet["actual"], quiet["actual_missing"]) == (None, why)
    assert f"planned against actual: none ({why})" in daemon.cli("status", "quiet").stdout
    missing = daemon.cli("status", "nope")
    assert missing.returncode != 0 and "nope" in missing.stderr

    assert daemon.http.post("/instances/told/stop").status_code == 202
    stopped = daemon.wait_for("told", lambda i: i["state"] == "stopped")
    assert stopped["actual"] is None  # of a server that no longer runs, nothing is shown
    assert "a check is made once its server is ready" in daemon.cli("status", "told").stdout
