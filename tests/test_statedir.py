"""The state directory's layout (launcher/statedir/layout.py): the lock, the children file and the logs are
where it says, for the daemon's parts and the CLI alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.errors import LauncherError
from launcher.statedir.layout import StateDir
from launcher.statedir.owner import LOCK_FDS_ENV, StateDirLock, read_owner
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


_CLAIM = """
import os
import sys
from pathlib import Path
from launcher.statedir.owner import LOCK_FDS_ENV, StateDirLock
# An exec keeps the pid the value is bound to; this child stands in for it under a pid of its own.
os.environ[LOCK_FDS_ENV] = str(os.getpid()) + ":" + os.environ[LOCK_FDS_ENV].partition(":")[2]
lock = StateDirLock.claim(Path(sys.argv[1]), "http://new")
print("claimed", flush=True)
sys.stdin.read()
"""


def test_an_upgrade_hands_the_state_directory_lock_over_so_no_other_daemon_takes_it_meanwhile(
    tmp_path: Path,
) -> None:
    """The descriptors `hand_over` names are adopted by `claim` in the program that gets them (here a child
    given them as an exec would keep them); while either holds them, a third claim is refused."""
    state = tmp_path / "state"
    lock = StateDirLock.claim(state, "http://old")
    env = {**os.environ, **lock.hand_over()}
    fds = [int(fd) for fd in env[LOCK_FDS_ENV].partition(":")[2].split(",")]
    new = subprocess.Popen(
        [sys.executable, "-c", _CLAIM, str(state)],
        env=env,
        pass_fds=fds,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert new.stdout is not None and new.stdout.readline() == "claimed\n"
        for fd in fds:  # the old program's copies closed, as at its exec: the new one's hold the lock alone
            os.close(fd)
        assert json.loads(StateDir(state).lock_file.read_text())["url"] == "http://new"
        with pytest.raises(LauncherError, match="owns the state directory"):
            StateDirLock.claim(state, "http://third")
    finally:
        assert new.stdin is not None
        new.stdin.close()
        assert new.wait(timeout=30) == 0
    StateDirLock.claim(state, "http://after").release()  # let go at the new program's end


def test_descriptors_handed_over_for_another_directory_are_not_adopted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = StateDirLock.claim(tmp_path / "other", "http://other")
    monkeypatch.setenv(LOCK_FDS_ENV, other.hand_over()[LOCK_FDS_ENV])
    mine = StateDirLock.claim(tmp_path / "mine", "http://mine")  # claimed as usual: not the other's lock
    assert json.loads(StateDir(tmp_path / "mine").lock_file.read_text())["url"] == "http://mine"
    mine.release()


@pytest.mark.parametrize("bound_to_parent", [False, True])
def test_descriptors_named_by_another_process_are_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bound_to_parent: bool
) -> None:
    """A value a normal start inherited (stale, or forged) names descriptors that are not the lock: they are
    neither taken nor closed (before: a pipe named there was closed, and its number reused for the lock)."""
    StateDirLock.claim(tmp_path / "state", "http://first").release()
    read_end, write_end = os.pipe()
    try:
        monkeypatch.setenv(LOCK_FDS_ENV, f"{os.getppid()}:{write_end}" if bound_to_parent else str(write_end))
        lock = StateDirLock.claim(tmp_path / "state", "http://mine")
        assert os.write(write_end, b"x") == 1 and os.read(read_end, 1) == b"x"  # still the pipe
        assert LOCK_FDS_ENV not in os.environ
        lock.release()
    finally:
        os.close(read_end)
        os.close(write_end)
