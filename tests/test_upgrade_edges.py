"""Upgrades in place at their edges: a configuration that does not load, an API stream that never ends
(stand-in servers)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import httpx
import psutil
import pytest

from launcher.plan.placement import Placement
from launcher.schema_instances import Event
from launcher.statedir.layout import StateDir
from launcher.statedir.owner import LOCK_FDS_ENV, StateDirLock
from launcher.supervise.adoption import adopt_all
from launcher.supervise.handover import HandedServer, HandOver, take
from launcher.supervise.leftovers import INSTANCE_ENV, ChildRegistry
from launcher.supervise.parts import DaemonParts
from tests.conftest import ConfigWriter, Daemon, OpenWired, free_port, poll_until, read_of_a_fifo
from tests.test_drain import completed, release, serving, the_rest
from tests.test_front_door import first_event, held
from tests.test_upgrade import gone, program_start, program_started_at, upgraded

StartDaemon = Callable[[Path], Daemon]


def test_an_upgrade_with_a_configuration_that_does_not_load_keeps_the_daemon_and_its_servers(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    """The program executed again reads the file as `serve` does: one that does not load would end the
    daemon, and every server with it (before: 202, then the daemon exited 2 and its servers were killed)."""
    daemon = serving(write_config, start_daemon, standin)
    pid = daemon.instance("m")["pid"]
    before = program_start(daemon)
    config = Path(daemon.config)
    config.write_text(config.read_text() + "\nnot_a_key: 1\n")

    answer = httpx.post(f"{daemon.url}/daemon/upgrade", timeout=10)

    assert answer.status_code == 409, answer.text
    assert "not_a_key" in answer.json()["detail"]
    assert daemon.proc.poll() is None and program_started_at(daemon) == before
    assert daemon.instance("m")["pid"] == pid


def test_an_open_event_stream_does_not_hold_the_upgrade_up(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    """A dashboard or `launcher events` follows /events for hours: the API must not stay unanswered for the
    models' drain_timeout_s (30 s by default) while it waits for that stream, which never ends by itself
    (before: 21.7 s here, with drain_timeout_s 20)."""
    daemon = serving(write_config, start_daemon, standin, drain_timeout_s=20)
    pid = daemon.instance("m")["pid"]
    before = program_start(daemon)
    with daemon.http.stream("GET", "/events", params={"follow": "true"}, timeout=60) as stream:
        assert stream.status_code == 200
        began = time.monotonic()
        daemon.proc.send_signal(signal.SIGUSR2)
        upgraded(daemon, before)
        waited_s = time.monotonic() - began
    # Well under drain_timeout_s (20 s): the bridge's start takes seconds of it on a loaded host.
    assert waited_s < 15, f"the API answered again only after {waited_s:.1f}s"
    assert daemon.instance("m")["pid"] == pid


def test_a_handed_over_server_that_ended_before_its_adoption_is_reaped(tmp_path: Path) -> None:
    """A server that dies between the record and the adoption is this process's child: it is reaped, not
    left a zombie for the daemon's whole life (before: nothing waited for it)."""
    child = subprocess.Popen([sys.executable, "-c", ""], env={**os.environ, INSTANCE_ENV: "m"})
    created = psutil.Process(child.pid).create_time()
    poll_until(lambda: psutil.Process(child.pid).status(), lambda s: s == psutil.STATUS_ZOMBIE, "its end", 10)
    server = HandedServer(
        instance="m", pid=child.pid, create_time=created, port=1, argv=["x"], settings_json="{}", plan=None
    )
    lock = StateDirLock.claim(tmp_path / "state", "http://test")
    events: list[Event] = []
    parts = SimpleNamespace(registry=ChildRegistry(lock), on_event=events.append)
    try:
        again = asyncio.run(adopt_all([server], {}, lambda _plan: Placement(), cast(DaemonParts, parts), None))
    finally:
        lock.release()
    assert again == ["m"] and "it has ended" in events[0].message
    assert not psutil.pid_exists(child.pid)
    child.returncode = 0  # reaped by the adoption: Popen must not wait for it again


def test_a_server_killed_during_the_exec_is_reaped_and_started_again(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    """Killed while the new program loads (after the record, before its adoption): reaped, not left a zombie
    child of the daemon, and its model started again."""
    daemon = serving(write_config, start_daemon, standin)
    pid = daemon.instance("m")["pid"]
    before = program_start(daemon)
    daemon.proc.send_signal(signal.SIGUSR2)
    poll_until(lambda: "upgrade: executing" in "".join(daemon.log), bool, "the exec", 30)
    os.kill(pid, signal.SIGKILL)  # the new program is still importing its modules
    upgraded(daemon, before)
    assert daemon.wait_for("m", lambda s: s["state"] == "ready" and s["pid"] != pid)["restarts"] == 0
    assert not psutil.pid_exists(pid)


@pytest.mark.parametrize("record", [HandOver(daemon_pid=os.getpid(), servers=[]).model_dump_json(), "{not json"])
async def test_a_server_the_old_program_had_not_recorded_is_stopped_by_the_new_one(
    write_config: ConfigWriter, open_wired: OpenWired, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record: str
) -> None:
    """The exec may come while a start is suspended between its fork and the children file: that server,
    in no record, would run unsupervised beside its model's new start until the daemon ends; so too when
    the record does not load (before: only a record that loaded had them stopped). Here this process stands
    in for the daemon executed again, with such a child, and the state directory's lock handed over."""
    config = write_config({"m": {}})
    old_program = StateDirLock.claim(tmp_path / "state", "http://old")  # released by the wiring, which takes it
    monkeypatch.setenv(LOCK_FDS_ENV, old_program.hand_over()[LOCK_FDS_ENV])
    (tmp_path / "state" / "handover.json").write_text(record)
    stray = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import time; time.sleep(60)",
        env={**os.environ, INSTANCE_ENV: "m"},
        start_new_session=True,
    )

    wired = await open_wired(config)

    await asyncio.wait_for(stray.wait(), 10)  # its code is unknown: the wiring reaped it
    assert not psutil.pid_exists(stray.pid)
    described = [e.message for e in wired.events.recent(50)]
    assert any(f"not recorded yet: m (pid {stray.pid})" in message for message in described), described


def test_a_sigterm_during_the_hand_over_stops_the_daemon(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path, tmp_path: Path
) -> None:
    """The hand-over runs outside the event loop, which handles SIGTERM: one that came then was lost in the
    exec, and the new program served on. Here the record's write waits on a FIFO in its place, so the
    SIGTERM comes while the hand-over is under way."""
    daemon = serving(write_config, start_daemon, standin)
    pid = daemon.instance("m")["pid"]
    fifo = tmp_path / "state" / "handover.tmp"
    os.mkfifo(fifo)
    daemon.proc.send_signal(signal.SIGUSR2)
    poll_until(lambda: "SIGUSR2: upgrading" in "".join(daemon.log), bool, "the upgrade's start", 10)
    poll_until(lambda: _waits_on_a_fifo(daemon.proc.pid), bool, "the record's write waiting on the FIFO", 10)
    daemon.proc.send_signal(signal.SIGTERM)
    try:  # lets a write still waiting go on (the code before the fix waited there)
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        reader = None  # the daemon stopped waiting and removed it already
    try:
        assert daemon.proc.wait(timeout=30) == 0
    finally:
        if reader is not None:
            os.close(reader)
    assert "SIGTERM came during the hand-over: stopping instead" in "".join(daemon.log)
    assert not psutil.pid_exists(pid)


def _waits_on_a_fifo(pid: int) -> bool:
    """The process's main thread waits in open(2) of a FIFO for a reader (the kernel's wait channel)."""
    return Path(f"/proc/{pid}/wchan").read_text() in ("wait_for_partner", "fifo_open")


def _bridge_of(daemon: Daemon) -> psutil.Process | None:
    """The upgrade's bridge, a child of the daemon, while there is one."""
    for child in psutil.Process(daemon.proc.pid).children():
        with contextlib.suppress(psutil.Error):
            if "launcher.bridge" in child.cmdline():
                return child
    return None


def test_a_stop_while_the_bridge_starts_ends_the_bridge(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    """SIGTERM while the upgrade waits for its bridge to start: the bridge must end with the upgrade, not go
    on to accept on the daemon's socket (answering 503 "being upgraded", and proxying to servers that drain)
    through the whole stop (before: nothing ended it until the daemon's exit). The bridge is held stopped
    before it serves, and a stream in flight keeps the daemon draining."""
    daemon = serving(write_config, start_daemon, standin, drain_timeout_s=20)
    with daemon.http.stream("POST", "/v1/chat/completions", json=held("m")) as stream:
        lines = stream.iter_lines()
        first_event(lines)
        daemon.proc.send_signal(signal.SIGUSR2)
        bridge = poll_until(lambda: _bridge_of(daemon), lambda b: b is not None, "the bridge's start", 30)
        assert bridge is not None
        bridge.suspend()
        assert "answers until the new program" not in "".join(daemon.log), "the bridge served before its stop"
        daemon.proc.send_signal(signal.SIGTERM)
        poll_until(lambda: daemon.instance("m")["state"], lambda s: s == "draining", "the stop's drain", 30)

        poll_until(bridge.is_running, lambda running: not running, "the bridge's end", 10)

        assert daemon.proc.poll() is None  # still draining: the bridge ended with the upgrade, not the daemon
        release(daemon, "m")
        assert completed(the_rest(lines))
    assert daemon.proc.wait(timeout=30) == 0


def test_a_record_that_is_a_fifo_or_huge_is_refused_unread(tmp_path: Path) -> None:
    """handover.json is read at every daemon start: a FIFO in its place held the start for ever (with SIGTERM,
    which the event loop handles), and a huge file was read whole."""
    state = StateDir(tmp_path)
    assert read_of_a_fifo(state.handover_file, lambda: take(state, os.getpid())) is None
    assert not state.handover_file.exists()
    with state.handover_file.open("wb") as huge:
        huge.truncate(64 * 2**20)  # sparse: no disk taken
    tracemalloc.start()
    try:
        assert take(state, os.getpid()) is None
        peak_b = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak_b < 32 * 2**20, f"{peak_b / 2**20:.0f} MiB held to read it"


def test_a_record_that_names_a_server_twice_is_not_taken(tmp_path: Path) -> None:
    """Each entry is adopted on its own: a second one for the same server failed (its instance runs
    already), and that failure killed the server the first had just taken over."""
    state = StateDir(tmp_path)
    server = HandedServer(instance="m", pid=2, create_time=0, port=1, argv=["x"], settings_json="{}", plan=None)
    for twice in (server, server.model_copy(update={"instance": "n"}), server.model_copy(update={"pid": 3})):
        record = HandOver.model_construct(daemon_pid=os.getpid(), servers=[server, twice], starting=[])
        state.handover_file.write_text(record.model_dump_json())
        assert take(state, os.getpid()) is None
    state.handover_file.write_text(HandOver(daemon_pid=os.getpid(), servers=[server]).model_dump_json())
    assert take(state, os.getpid()) is not None


def test_a_stop_during_an_upgrades_drain_ends_the_bridge(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    """SIGTERM once the bridge answers, while the upgrade drains: the daemon stops instead, and the bridge must
    not answer through the stop's drain (before: it answered /health with the health of before, 200, and
    proxied new requests to the draining servers, until the daemon's end)."""
    daemon = serving(write_config, start_daemon, standin, drain_timeout_s=20)
    port = daemon.instance("m")["port"]
    with daemon.http.stream("POST", "/v1/chat/completions", json=held("m")) as stream:
        lines = stream.iter_lines()
        first_event(lines)
        daemon.proc.send_signal(signal.SIGUSR2)
        poll_until(lambda: "answers until the new program" in "".join(daemon.log), bool, "the bridge", 30)
        bridge = _bridge_of(daemon)
        assert bridge is not None

        daemon.proc.send_signal(signal.SIGTERM)

        poll_until(lambda: gone(bridge.pid), bool, "the bridge's end", 15)
        assert daemon.proc.poll() is None  # still draining
        # Let the stand-in finish (asked of the server itself: the daemon's API accepts no more).
        assert httpx.post(f"http://127.0.0.1:{port}/release", json={}, timeout=10).status_code == 200
        assert completed(the_rest(lines))
    assert daemon.proc.wait(timeout=30) == 0
    assert "SIGTERM came during the hand-over" not in "".join(daemon.log)  # it stopped before the hand-over


def test_a_record_left_by_another_process_is_not_taken(tmp_path: Path) -> None:
    """Only the process whose exec wrote it takes the record (another daemon's start finds a stale one); it
    is removed either way, so that it is used once."""
    state = StateDir(tmp_path)
    server = HandedServer(instance="m", pid=2, create_time=0, port=1, argv=["x"], settings_json="{}", plan=None)
    for pid, taken in ((os.getppid(), False), (os.getpid(), True)):
        state.handover_file.write_text(HandOver(daemon_pid=pid, servers=[server]).model_dump_json())
        assert (take(state, os.getpid()) is not None) == taken
        assert not state.handover_file.exists()


async def test_a_server_is_not_taken_over_on_a_port_where_another_process_answers(
    write_config: ConfigWriter, open_wired: OpenWired, standin: Path
) -> None:
    """The record says where the front door sends the model's requests: a port where another process answers
    health checks (before: taken, its model's requests went there) is not the server's, and the server
    is stopped and its model started again. Here this process stands in for the daemon executed again."""
    wired = await open_wired(write_config({"m": {"binary": str(standin)}}))
    ports = free_port(), free_port()
    ours, other = [
        await asyncio.create_subprocess_exec(
            str(standin), "--host", "127.0.0.1", "--port", str(port), env={**os.environ, **env}, start_new_session=True
        )
        for port, env in zip(ports, ({INSTANCE_ENV: "m"}, {}), strict=True)
    ]
    try:
        async with httpx.AsyncClient() as http:
            for port in ports:
                await _until_healthy(http, port)
        process = psutil.Process(ours.pid)
        settings = wired.manager.instances["m"].settings.model_dump_json()
        handed = HandedServer(
            instance="m",
            pid=ours.pid,
            create_time=process.create_time(),
            port=ports[1],
            argv=process.cmdline(),
            settings_json=settings,
            plan=None,
        )

        assert await wired.manager.adopt([handed]) == ["m"]

        await asyncio.wait_for(ours.wait(), 10)  # killed and reaped by the adoption
        assert wired.manager.instances["m"].port != ports[1]
        described = [e.message for e in wired.events.recent(50)]
        assert any(f"does not listen on port {ports[1]}" in message for message in described), described
    finally:
        for proc in (ours, other):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def _until_healthy(http: httpx.AsyncClient, port: int) -> None:
    async with asyncio.timeout(30):
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"http://127.0.0.1:{port}/health", timeout=1)).status_code == 200:
                    return
            await asyncio.sleep(0.05)


async def test_a_server_that_died_during_the_exec_is_reaped_by_the_new_program(
    write_config: ConfigWriter, open_wired: OpenWired, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server still on its way at the exec (so in no record's servers) that died meanwhile is a zombie
    child of the new program: reaped, not left for the daemon's whole life (before: its environment could
    not be read, so nothing looked at it). This process stands in for the daemon executed again."""
    config = write_config({"m": {}})
    old_program = StateDirLock.claim(tmp_path / "state", "http://old")  # released by the wiring, which takes it
    monkeypatch.setenv(LOCK_FDS_ENV, old_program.hand_over()[LOCK_FDS_ENV])
    record = HandOver(daemon_pid=os.getpid(), servers=[], starting=["m"])
    (tmp_path / "state" / "handover.json").write_text(record.model_dump_json())
    died = _ended_child({INSTANCE_ENV: "m"})

    await open_wired(config)

    assert not psutil.pid_exists(died)


def _ended_child(env: dict[str, str]) -> int:
    """A child of this process, with ``env``, that has ended and was not reaped (a zombie): its pid."""
    pid = os.posix_spawn(sys.executable, [sys.executable, "-c", ""], {**os.environ, **env})
    poll_until(lambda: psutil.Process(pid).status(), lambda s: s == psutil.STATUS_ZOMBIE, "its end", 10)
    return pid
