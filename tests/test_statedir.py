"""The state directory's layout (launcher/statedir/layout.py): the lock, the children file and the logs are
where it says, for the daemon's parts and the CLI alike."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from launcher.statedir.layout import StateDir
from launcher.statedir.owner import StateDirLock, read_owner
from launcher.supervise.leftovers import ChildRegistry


def test_every_file_has_its_own_place_inside_the_state_directory(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    files = [state.lock_file, state.children_file, state.daemon_log, state.server_log("tiny")]
    assert len(set(files)) == len(files)
    assert all(path.is_relative_to(state.root) for path in files)
    assert state.server_log("tiny").parent == state.logs_dir
    assert state.server_log("tiny@1") != state.server_log("tiny")  # a replica's log is its own
    assert not state.root.exists()  # naming a path creates nothing


def test_the_owner_and_its_children_are_recorded_where_the_layout_says(tmp_path: Path) -> None:
    lock = StateDirLock.claim(tmp_path / "state", "http://127.0.0.1:1")
    try:
        assert lock.state_dir == StateDir(tmp_path / "state")
        assert json.loads(lock.state_dir.lock_file.read_text())["pid"] == os.getpid()
        owner = read_owner(tmp_path / "state")
        assert owner is not None and owner.pid == os.getpid()
        ChildRegistry(lock).add("tiny", os.getpid(), sys.executable)  # this process stands in for a server
        records = json.loads(lock.state_dir.children_file.read_text())
        assert [(r["instance"], r["pid"]) for r in records] == [("tiny", os.getpid())]
    finally:
        lock.release()
    assert read_owner(tmp_path / "state") is None
