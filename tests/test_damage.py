"""Supervision under damage, for real: kill -9 in a row, a daemon killed with SIGKILL, servers that ignore
SIGTERM or fork, crash loops, hangs, leftovers from an earlier daemon, VRAM that comes back late, 100
concurrent restarts, rotating logs. Every test checks that no process it started is left."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from launcher.config_file import load_settings
from launcher.gpu.sampler import Sampler
from launcher.process_start import same_start
from launcher.schema_gpus import GpuSample
from launcher.schema_instances import State
from launcher.supervise.instance import Instance
from tests.conftest import ConfigWriter, Daemon, OpenManager, OpenWired, marked_processes

FAST_RESTART = {"policy": "on-failure", "backoff_initial": 0.01, "backoff_max": 0.05, "burst": 1000, "interval": 60}


def is_ready(instance: Instance) -> bool:
    return instance.state == State.READY


async def test_fifty_kill_9_in_a_row(write_config: ConfigWriter, open_manager: OpenManager) -> None:
    manager = await open_manager(write_config({"tiny": {"restart": FAST_RESTART}}))
    instance = manager.get("tiny")
    await manager.start("tiny")
    await instance.wait_until(is_ready, 30)
    pids = set()
    for n in range(50):
        pid = instance.status().pid
        assert pid is not None
        pids.add(pid)
        os.kill(pid, signal.SIGKILL)
        await instance.wait_until(lambda i, n=n: i.restarts == n + 1 and is_ready(i), 30)  # type: ignore[misc]
    assert instance.restarts == 50
    assert len(pids) == 50
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


async def test_a_server_ignoring_sigterm_is_killed_with_its_grandchild(
    write_config: ConfigWriter, open_manager: OpenManager, standin: Path, leaves_no_process: str
) -> None:
    env = {"STANDIN_IGNORE_TERM": "1", "STANDIN_GRANDCHILD": "1"}
    config = write_config({"stubborn": {"binary": str(standin), "stop_timeout": 0.5, "env": env}})
    manager = await open_manager(config)
    instance = manager.get("stubborn")
    await manager.start("stubborn")
    await instance.wait_until(is_ready, 30)
    group = [p for p in marked_processes(leaves_no_process)]
    assert len(group) == 2  # the server and its grandchild
    began = time.monotonic()
    await manager.stop("stubborn")
    took = time.monotonic() - began
    assert 0.5 <= took < 3
    assert instance.status().last_exit == "killed by SIGKILL"
    _, alive = psutil.wait_procs(group, timeout=2)
    assert alive == []


async def test_a_crash_loop_follows_the_backoff_and_fails_without_using_cpu(
    write_config: ConfigWriter, open_manager: OpenManager, standin: Path
) -> None:
    restart = {"policy": "on-failure", "backoff_initial": 0.2, "backoff_max": 0.8, "burst": 4, "interval": 60}
    env = {"STANDIN_CRASH_AT_START": "1"}
    manager = await open_manager(write_config({"crashy": {"binary": str(standin), "restart": restart, "env": env}}))
    instance = manager.get("crashy")
    cpu_before = psutil.Process().cpu_times()
    began = time.monotonic()
    await manager.start("crashy")
    await instance.wait_until(lambda i: i.state == State.FAILED, 30)
    elapsed = time.monotonic() - began
    cpu = psutil.Process().cpu_times()
    status = instance.status(events=50)
    delays = [e.message for e in status.events if e.state == State.BACKOFF and e.kind == "state"]
    assert delays == ["restarting in 0.20s", "restarting in 0.40s", "restarting in 0.80s", "restarting in 0.80s"]
    assert elapsed >= 2.2  # the waits were really waited
    # Waiting is sleeping: the daemon's own CPU over the whole loop stays far below the time it took.
    assert (cpu.user + cpu.system) - (cpu_before.user + cpu_before.system) < 0.5 * elapsed
    assert status.last_exit == "exited with code 1"
    assert any("crashing at start" in line for line in status.log_tail)
    # Its last words first, then why it is not tried again.
    assert status.last_error is not None
    assert status.last_error.startswith("standin: crashing at start (pid ")
    assert status.last_error.endswith(") (gave up after more than 4 restarts in 60s)")
    started = await manager.start("crashy")  # an operator's start leaves failed, and the answer says so
    assert (started.state, started.last_error) == (State.STARTING, None)


async def test_a_hung_server_is_detected_and_replaced(write_config: ConfigWriter, open_manager: OpenManager) -> None:
    health = {"interval": 0.2, "timeout": 0.2, "failures": 3}
    manager = await open_manager(write_config({"tiny": {"health": health, "restart": FAST_RESTART}}))
    instance = manager.get("tiny")
    await manager.start("tiny")
    await instance.wait_until(is_ready, 30)
    pid = instance.status().pid
    assert pid is not None
    stopped_at = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    await instance.wait_until(lambda i: i.state == State.UNHEALTHY, 10)
    await instance.wait_until(lambda i: i.restarts == 1 and is_ready(i), 30)
    took = time.monotonic() - stopped_at
    assert took < 0.2 * 3 + 0.2 * 3 + 5  # probe interval x failures, their timeouts, the new load
    assert instance.status().pid != pid
    assert instance.status().last_error == "killed after 3 failed health checks"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def test_a_slow_load_beyond_its_timeout_is_a_failed_start(
    write_config: ConfigWriter, open_manager: OpenManager, standin: Path
) -> None:
    restart = {"policy": "on-failure", "backoff_initial": 0.05, "backoff_max": 0.05, "burst": 1, "interval": 60}
    model = {"binary": str(standin), "env": {"STANDIN_LOAD_S": "30"}, "restart": restart}
    manager = await open_manager(write_config({"slow": {**model, "health": {"load_timeout": 0.5}}}))
    instance = manager.get("slow")
    await manager.start("slow")
    await instance.wait_until(lambda i: i.state == State.FAILED, 30)
    status = instance.status(events=50)
    # The stop's SIGTERM ends the stand-in (it keeps SIGTERM's default action while loading) well within
    # stop_timeout: every start ended that way, never with the SIGKILL that follows a timeout.
    assert (status.last_exit, status.last_exit_signal) == ("killed by SIGTERM", signal.SIGTERM)
    exits = [e.message for e in status.events if e.kind == "exit"]
    assert exits == ["server killed by SIGTERM"] * 2  # the first start and the one restart burst: 1 allows
    timeouts = [e.message for e in status.events if "load_timeout" in e.message]
    assert timeouts == ["not ready within load_timeout (0.5s)"] * 2


async def test_one_hundred_concurrent_restarts_make_one(
    write_config: ConfigWriter, open_manager: OpenManager, leaves_no_process: str
) -> None:
    manager = await open_manager(write_config())
    instance = manager.get("tiny")
    await manager.start("tiny")
    await instance.wait_until(is_ready, 30)
    before = instance.status().pid
    await asyncio.gather(*(manager.restart("tiny") for _ in range(100)))
    await instance.wait_until(is_ready, 30)
    starts = [e for e in instance.status(events=50).events if e.kind == "state" and e.state == State.LOADING]
    assert len(starts) == 2  # the first start and one restart
    assert instance.status().pid != before
    assert len(marked_processes(leaves_no_process)) == 1


async def test_memory_a_killed_server_held_is_waited_for(write_config: ConfigWriter, open_wired: OpenWired) -> None:
    gpus = {
        "backend": "sim",
        "poll_interval": 0.05,
        "margin_mib": 0,
        # Tight: the new server fits only once the killed one's ~513 MiB are back.
        "sim": [{"name": "Sim", "memory_mib": 900, "release_delay_s": 1.0}],
    }
    settings = load_settings(write_config({"tiny": {"restart": FAST_RESTART}}, gpus=gpus))
    wired = await open_wired(settings)  # with the simulated GPUs
    manager = wired.manager
    instance = manager.get("tiny")
    await manager.start("tiny")
    await instance.wait_until(is_ready, 30)
    claim = instance.placement.claims_mib[0]
    await gpu_reading(wired.sampler, lambda s: (s.memory_used_mib or 0) >= claim)  # the card holds the server's memory
    pid = instance.status().pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await instance.wait_until(lambda i: i.restarts == 1 and is_ready(i), 30)
    events = instance.status(events=50).events
    exited = next(e for e in events if e.kind == "exit")
    loading = [e for e in events if e.state == State.LOADING][-1]
    waited = _seconds(loading.time) - _seconds(exited.time)
    assert waited >= 0.8  # the memory came back after 1 s, and the new server started after it
    waits = [e.message for e in wired.events.recent(500) if e.kind == "vram"]
    assert any("waiting for memory to come back on GPU 0" in message for message in waits)


async def gpu_reading(sampler: Sampler, matches: Callable[[GpuSample], bool]) -> GpuSample:
    """The first GPU sample, from now on, that ``matches`` (the sampler calls its listeners on the loop)."""
    found: asyncio.Future[GpuSample] = asyncio.get_running_loop().create_future()

    def listener(sample: GpuSample) -> None:
        if matches(sample) and not found.done():
            found.set_result(sample)

    sampler.subscribe(listener)
    return await asyncio.wait_for(found, 10)


def _seconds(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp).timestamp()


async def test_logs_rotate_by_size_and_keep_markers(write_config: ConfigWriter, open_manager: OpenManager) -> None:
    config = write_config({"tiny": {}}, daemon={"log_max_mib": 0.0005, "log_keep": 2})  # 512 bytes
    manager = await open_manager(config)
    instance = manager.get("tiny")
    for _ in range(4):
        await manager.start("tiny")
        await instance.wait_until(is_ready, 30)
        await manager.stop("tiny")
    log = instance.log_path
    rotated = [log.with_name(f"{log.name}.{n}") for n in (1, 2)]
    assert all(p.exists() for p in rotated)
    assert not log.with_name(f"{log.name}.3").exists()
    assert "=== launcher" in log.read_text()


def test_daemon_killed_with_sigkill_takes_its_servers_and_the_next_start_is_clean(
    write_config: ConfigWriter, marked_env: dict[str, str], leaves_no_process: str
) -> None:
    config = write_config({name: {"autostart": True} for name in ("one", "two", "three")})
    daemon = Daemon(config, marked_env)
    pids = [daemon.wait_for(name, lambda s: s["state"] == "ready")["pid"] for name in ("one", "two", "three")]
    servers = [psutil.Process(p) for p in pids]  # taken while they run: they may be gone and reaped at once
    daemon.proc.kill()
    daemon.proc.wait()
    _, alive = psutil.wait_procs(servers, timeout=1.0)
    # Dead servers whose new parent (init here) has not reaped them yet are zombies: they hold nothing.
    running = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert running == [], "servers outlived a daemon killed with SIGKILL by more than a second"
    daemon.http.close()
    assert daemon.proc.stdout is not None
    daemon.proc.stdout.close()
    state = json.loads((config.parent / "state" / "children.json").read_text())
    assert sorted(r["pid"] for r in state) == sorted(pids)  # what the next start will check
    again = Daemon(config, marked_env)
    try:
        new_pids = [again.wait_for(n, lambda s: s["state"] == "ready")["pid"] for n in ("one", "two", "three")]
        state = json.loads((config.parent / "state" / "children.json").read_text())
        assert sorted(r["pid"] for r in state) == sorted(new_pids)  # the old records were dropped
    finally:
        again.stop()
    assert marked_processes(leaves_no_process) == []


def test_leftovers_of_an_earlier_daemon_are_stopped_and_strangers_left_alone(
    write_config: ConfigWriter, marked_env: dict[str, str], standin: Path, tmp_path: Path
) -> None:
    config = write_config({"tiny": {}})
    state_dir = config.parent / "state"
    state_dir.mkdir(parents=True, exist_ok=True)
    # A server that escaped an earlier daemon (no parent-death signal), recorded before NTP moved the clock by
    # a second (psutil's start time moves with it), and a stranger whose pid is recorded with another start
    # time (its pid was reused).
    escaped = subprocess.Popen(
        [str(standin), "--port", "0"], env=marked_env | {"LAUNCHER_INSTANCE": "tiny"}, start_new_session=True
    )
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=marked_env)
    try:
        records = [
            {"instance": "tiny", "pid": escaped.pid, "create_time": psutil.Process(escaped.pid).create_time() - 1,
             "exe": str(standin)},
            {"instance": "old", "pid": stranger.pid, "create_time": 1.0, "exe": sys.executable},
        ]  # fmt: skip
        (state_dir / "children.json").write_text(json.dumps(records))
        daemon = Daemon(config, marked_env)
        try:
            assert escaped.wait(timeout=10) == -signal.SIGTERM  # stopped by the new daemon, at its first signal
            assert stranger.poll() is None  # not ours: untouched
            events = daemon.http.get("/instances/tiny").json()  # the daemon answers
            assert events["state"] == "stopped"
        finally:
            daemon.stop()
    finally:
        stranger.kill()
        stranger.wait()
        if escaped.poll() is None:
            escaped.kill()
            escaped.wait()


@pytest.mark.parametrize(
    ("moved_s", "same"),
    [(0.0, True), (1.0, True), (-3.0, True), (600.0, True), (0.01, False), (0.5, False), (-1.99, False),
     (601.0, False)],
)  # fmt: skip
def test_a_start_time_is_the_same_whole_seconds_of_clock_adjustment_apart(moved_s: float, same: bool) -> None:
    recorded_s = 1796161544.24  # a create_time as psutil gives it: boot time (whole seconds) + ticks
    assert same_start(recorded_s, recorded_s + moved_s) is same
