"""Acts on instances across an upgrade in place: asked on a connection the old program still serves while the
upgrade drains, a start, stop or restart is refused with the reason (the exec would cut it part-way: a
restart's new server handed over as starting, a stop half done), and taken again by the new program, or
by the old one after an exec that failed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx

from tests.conftest import ConfigWriter, Daemon, poll_until
from tests.test_drain import serving
from tests.test_upgrade import program_start, upgraded
from tests.test_upgrade_answers import upgrade_draining

StartDaemon = Callable[[Path], Daemon]
_ACTS = ("start", "stop", "restart")


def test_an_act_asked_while_an_upgrade_drains_is_refused_then_taken_by_the_new_program(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path
) -> None:
    daemon = serving(write_config, start_daemon, standin, drain_timeout_s=20)
    before = program_start(daemon)
    pid = daemon.instance("m")["pid"]
    with upgrade_draining(daemon) as kept:
        refused = {act: kept.post(f"/instances/m/{act}") for act in _ACTS}
        during = kept.get("/instances/m").json()
    for act, answer in refused.items():
        assert answer.status_code == 409, (act, answer.text)
        assert "an upgrade is under way" in answer.json()["detail"], act
    assert (during["state"], during["pid"]) == ("ready", pid)  # none was done
    upgraded(daemon, before)
    assert (daemon.instance("m")["state"], daemon.instance("m")["pid"]) == ("ready", pid)  # handed over as it was
    stopped = httpx.post(f"{daemon.url}/instances/m/stop", timeout=30)  # the new program takes acts
    assert stopped.status_code == 202, stopped.text
    assert stopped.json()["state"] == "stopped"


def test_acts_are_taken_again_after_an_upgrade_that_failed(
    write_config: ConfigWriter, start_daemon: StartDaemon, tmp_path: Path, standin: Path
) -> None:
    daemon = serving(write_config, start_daemon, standin)
    pid = daemon.instance("m")["pid"]
    (tmp_path / "state" / "handover.json").mkdir()  # the record cannot replace a directory: the exec fails

    assert httpx.post(f"{daemon.url}/daemon/upgrade", timeout=10).status_code == 202
    poll_until(lambda: "serving on with the running program" in "".join(daemon.log), bool, "the failure", 30)

    def restart() -> httpx.Response:
        return httpx.post(f"{daemon.url}/instances/m/restart", timeout=30)

    restarted = poll_until(restart, lambda r: r.status_code != 503, "the API again", 10)  # the bridge, until then
    assert restarted.status_code == 202, restarted.text
    daemon.wait_for("m", lambda s: s["state"] == "ready" and s["pid"] not in (None, pid))  # a new server
