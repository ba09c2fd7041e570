"""Issue 23 points 2 and 3 through a real daemon and real llama-servers on the CPU: a plan the server
exceeds (a larger ubatch and an f32 K cache given through llama.cpp's environment, which the planner does
not read) raises a warning event, a warning in `launcher status` and `launcher doctor`, and the metrics
say by how much; what a run measured plans the next start within 1 MiB, `launcher plan` says so and
`--estimate` does not; a changed argument falls back to the estimate; `--forget` clears it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from launcher.config_file import load_settings
from launcher.schema_instances import Event
from launcher.wiring import Wired, supervision
from tests.conftest import READY_TIMEOUT_S, ConfigWriter, Daemon

# Seen by llama-server, not by the planner: compute buffers for 8192-token ubatches and an f32 K cache.
UNSEEN = {"LLAMA_ARG_UBATCH": "8192", "LLAMA_ARG_BATCH": "8192", "LLAMA_ARG_CACHE_TYPE_K": "f32"}


def _terms(plan_host: dict[str, int]) -> dict[str, int]:
    return {
        "weights": plan_host["weights_mib"] + plan_host["projector_mib"],
        "kv": plan_host["kv_cache_mib"],
        "state": plan_host["recurrent_mib"],
        "compute": plan_host["compute_mib"],
        "output": plan_host["output_mib"],
    }


def test_a_plan_the_server_exceeds_is_a_warning_in_events_status_doctor_and_metrics(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon]
) -> None:
    daemon = start_daemon(write_config({"wrong": {"ctx": 8192, "env": UNSEEN}}))
    assert daemon.http.post("/instances/wrong/start").status_code == 202
    wrong = daemon.wait_for("wrong", lambda i: i["state"] == "ready" and i["actual"] is not None)
    findings = wrong["actual"]["findings"]
    assert [(f["device"], f["term"], f["over"]) for f in findings] == [("CPU", "kv", True), ("CPU", "total", True)]
    kv, total = findings
    assert kv["difference_mib"] > 1 and total["mostly"] == "compute" and total["difference_mib"] > 32
    warnings = [e["message"] for e in daemon.instance("wrong")["events"] if e["kind"] == "plan-warning"]
    assert warnings == [kv["message"], total["message"]]
    assert kv["message"].startswith("wrong on CPU: kv ") and "more than planned" in kv["message"]

    status = daemon.cli("status")
    assert status.returncode == 0 and f"warning: wrong: {total['message']}" in status.stdout
    doctor = daemon.cli("doctor")
    assert [line for line in doctor.stdout.splitlines() if line.startswith("WARN  plan")] == [
        f"WARN  plan          {kv['message']}",
        f"WARN  plan          {total['message']}",
    ]
    metrics = daemon.http.get("/metrics").text
    [host] = wrong["actual"]["devices"]
    assert f'launcher_plan_error_mib{{device="CPU",instance="wrong"}} {host["difference_mib"]}' in metrics
    kv_actual = host["terms"]["kv"]["actual_mib"]
    assert f'launcher_plan_actual_mib{{device="CPU",instance="wrong",term="kv"}} {kv_actual}' in metrics


async def test_a_plan_warning_is_told_once_the_check_it_comes_from_is_shown(write_config: ConfigWriter) -> None:
    """Whoever hears a plan-warning and reads the instance finds the check it comes from (the warnings were
    told before the check was shown, while what it measured was being filed)."""
    settings = load_settings(write_config({"wrong": {"ctx": 8192, "env": UNSEEN}}))
    shown_when_told: list[bool] = []
    told = asyncio.Event()
    wired: list[Wired] = []

    def heard(event: Event) -> None:
        if event.kind == "plan-warning":
            shown_when_told.append(wired[0].manager.status("wrong").actual is not None)
            told.set()

    async with supervision(settings, heard) as parts:
        wired.append(parts)
        await parts.manager.start("wrong")
        await asyncio.wait_for(told.wait(), READY_TIMEOUT_S)
    assert shown_when_told and all(shown_when_told), shown_when_told


def test_the_next_start_plans_from_what_was_measured_until_a_setting_changes_or_it_is_forgotten(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon], tiny_model: Path
) -> None:
    daemon = start_daemon(
        write_config(
            {"tiny": {"ctx": 8192, "env": UNSEEN}, "changed": {"ctx": 8192, "env": UNSEEN, "args": ["-np", "2"]}}
        )
    )
    assert daemon.http.get("/plan/tiny").json()["measured"] is None
    assert daemon.http.post("/instances/tiny/start").status_code == 202
    first = daemon.wait_for("tiny", lambda i: i["state"] == "ready" and i["actual"] is not None)
    [host] = first["actual"]["devices"]
    assert first["actual"]["findings"]  # the estimate was short
    assert daemon.http.post("/instances/tiny/stop").status_code == 202
    daemon.wait_for("tiny", lambda i: i["state"] == "stopped")

    plan = daemon.http.get("/plan/tiny").json()
    assert plan["measured"] is not None
    for term, planned_mib in _terms(plan["host"]).items():
        assert 0 <= planned_mib - host["terms"][term]["actual_mib"] < 1, term
    shown = daemon.cli("plan", "tiny")
    assert f"terms: measured {plan['measured']}" in shown.stdout
    estimated = daemon.http.get("/plan/tiny", params={"estimate": "true"}).json()
    assert estimated["measured"] is None and estimated["host"]["compute_mib"] < plan["host"]["compute_mib"]
    assert "terms: estimated from the model's header" in daemon.cli("plan", "tiny", "--estimate").stdout
    assert daemon.http.get("/plan/changed").json()["measured"] is None  # another argument: the estimate

    # The second start runs with the measured plan: no finding, every term within 1 MiB.
    assert daemon.http.post("/instances/tiny/start").status_code == 202
    second = daemon.wait_for("tiny", lambda i: i["state"] == "ready" and i["actual"] is not None)
    assert second["plan"]["measured"] == plan["measured"] and second["actual"]["findings"] == []
    for term in second["actual"]["devices"][0]["terms"].values():
        assert 0 <= -term["difference_mib"] < 1
    assert daemon.http.post("/instances/tiny/stop").status_code == 202
    daemon.wait_for("tiny", lambda i: i["state"] == "stopped")

    forgotten = daemon.cli("plan", "tiny", "--forget")
    assert forgotten.returncode == 0 and "1 measurements forgotten" in forgotten.stdout
    assert daemon.http.get("/plan/tiny").json()["measured"] is None
    missing = daemon.cli("plan", "nope", "--forget")
    assert missing.returncode != 0 and "nope" in missing.stderr
