"""`peers:` applied live by a reload, on real daemons: a daemon started without peers reads one a reload
adds (its models are served through this front door), and forgets one a reload removes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ConfigWriter, Daemon, poll_until

StartDaemon = Callable[[Path], Daemon]


def test_peers_added_and_removed_by_a_reload(
    write_config: ConfigWriter, start_daemon: StartDaemon, standin: Path, tmp_path: Path
) -> None:
    b_config = write_config(
        {"far": {"binary": str(standin), "autostart": True}}, daemon={"state_dir": str(tmp_path / "b")}
    )
    b = start_daemon(b_config.rename(tmp_path / "b.yaml"))
    b.wait_for("far", lambda s: s["state"] == "ready")
    fast = {"peer_interval_s": 0.2}
    config = write_config({"near": {"binary": str(standin)}}, rpc=fast)
    a = start_daemon(config)
    kept: dict[str, Any] = yaml.safe_load(config.read_text())["daemon"]
    request = {"model": "far", "messages": [{"role": "user", "content": "Hi"}]}
    assert a.http.post("/v1/chat/completions", json=request).status_code == 404

    write_config({"near": {"binary": str(standin)}}, rpc=fast, daemon=kept, peers=[{"name": "b", "url": b.url}])
    done = a.http.post("/config/reload")
    assert done.status_code == 200, done.text
    assert (done.json()["applied"], done.json()["waiting"]) == (["peers"], [])
    poll_until(lambda: a.http.get("/peers").json(), lambda p: p and p[0]["reachable"], "b read", 10)
    served = a.http.post("/v1/chat/completions", json=request)
    assert served.status_code == 200, served.text  # b's model, through a's front door

    write_config({"near": {"binary": str(standin)}}, rpc=fast, daemon=kept)
    assert a.http.post("/config/reload").json()["applied"] == ["peers"]
    assert a.http.get("/peers").json() == []
    assert a.http.post("/v1/chat/completions", json=request).status_code == 404
