"""One owner per state directory: the serving daemon holds an exclusive lock on STATE_DIR itself and on
its lock file (STATE_DIR/daemon.lock, layout.py) for its whole life, and only the holder cleans leftovers
or spawns servers (the children file, children.py, needs the lock).

flock(2) belongs to the open file and dies with the process, so a daemon killed with SIGKILL never blocks
the next one. The lock on the directory is what deleting a file cannot break: with daemon.lock deleted, a
second daemon would lock a new file of that name, but not the directory. The lock on the file is kept for
a daemon of an earlier version, which locks only that. (Where the directory cannot be locked, as on some
network filesystems, the file's lock alone stands.) The descriptors are close-on-exec, so servers never
inherit the lock; an upgrade's exec is the one exception (`hand_over`): the program executed again adopts
the same locked descriptors, so no other daemon can take the directory while it starts. The holder writes
its pid, start time and API URL into the file; `read_owner` reads them without locking, so a command that
only reads never competes with a daemon that is starting.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from launcher.errors import ConfigError, LauncherError
from launcher.process_start import same_start
from launcher.statedir.layout import StateDir

LOCK_FDS_ENV = "LAUNCHER_LOCK_FDS"  # an upgrade's exec: the locked descriptors it hands over


def handing_fds(fds: list[int]) -> str:
    """The value naming ``fds`` to the program an upgrade executes in this process: bound to its pid (the
    exec keeps it), so that a value a normal start inherits by mistake is never taken (see `handed_fds`)."""
    return f"{os.getpid()}:{','.join(str(fd) for fd in fds)}"


def handed_fds(name: str) -> list[int] | None:
    """The descriptors this process's previous program named in $``name`` (`handing_fds`), taken out of
    the environment; None when there are none, or the value was not left by an exec of this process (a
    stale or forged value of a normal start: its descriptors are not ours, and are left open)."""
    value = os.environ.pop(name, None)
    if value is None:
        return None
    pid, _, named = value.partition(":")
    try:
        fds = [int(fd) for fd in named.split(",")]
        return fds if int(pid) == os.getpid() and all(fd >= 0 for fd in fds) else None
    except ValueError:
        return None


@dataclass(frozen=True)
class Owner:
    """The daemon that owns a state directory."""

    pid: int
    create_time: float  # the process's start time: a reused pid is not the owner
    url: str

    def describe(self) -> str:
        return f"a daemon (pid {self.pid}, API {self.url})"


class OwnedError(LauncherError):
    """Another live daemon holds the state directory (exit 1)."""


def read_owner(state_dir: Path) -> Owner | None:
    """The daemon that holds ``state_dir`` now, or None. Reads only: no lock is taken, nothing is written."""
    try:
        owner = Owner(**json.loads(StateDir(state_dir).lock_file.read_text()))
    except (OSError, ValueError, TypeError):
        return None  # no daemon ever ran here, one is writing the file this instant, or it was not ours
    import psutil  # only when no daemon answered: not on the path of every command

    try:
        alive = same_start(owner.create_time, psutil.Process(owner.pid).create_time())
    except psutil.Error:
        return None
    return owner if alive else None


class StateDirLock:
    """Proof of ownership of a state directory, held until `release` or the process's end."""

    def __init__(self, state_dir: Path, fds: list[int], *, handed_over: bool = False) -> None:
        self.state_dir = StateDir(state_dir)  # its files: only the holder of the lock may write them
        self._fds = fds  # the directory's (where it could be locked), then daemon.lock's
        # Kept from the program before an upgrade's exec: this process may have its children.
        self.handed_over = handed_over

    @classmethod
    def claim(cls, state_dir: Path, url: str) -> StateDirLock:
        """Take the state directory (or keep it: the locked descriptors an upgrade's exec handed over), or
        raise OwnedError naming the daemon that has it."""
        inherited = _inherited(state_dir)
        if inherited is not None:
            os.ftruncate(inherited[-1], 0)
            os.pwrite(inherited[-1], json.dumps(asdict(_me(url))).encode(), 0)
            return cls(state_dir, inherited, handed_over=True)
        fds: list[int] = []
        try:
            try:
                state_dir.mkdir(parents=True, exist_ok=True)
                fds.append(os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
                if not _lock(fds[0], state_dir, required=False):
                    os.close(fds.pop())
                # The directory first: a daemon refused there creates no daemon.lock in place of a deleted one.
                fds.append(os.open(StateDir(state_dir).lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644))
                _lock(fds[-1], state_dir, required=True)
                os.ftruncate(fds[-1], 0)
                os.pwrite(fds[-1], json.dumps(asdict(_me(url))).encode(), 0)
            except OSError as exc:
                raise ConfigError(
                    f"daemon.state_dir {state_dir} cannot be used: {exc.strerror}",
                    hint="give daemon.state_dir a folder this user can write (systemd: StateDirectory=)",
                ) from None
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return cls(state_dir, fds)

    def hand_over(self) -> dict[str, str]:
        """Before an upgrade's exec: the environment that hands the locked descriptors to the program executed
        again (they stay open across the exec; `claim` there adopts them)."""
        for fd in self._fds:
            os.set_inheritable(fd, True)
        return {LOCK_FDS_ENV: handing_fds(self._fds)}

    def keep_back(self) -> None:
        """The exec failed: the descriptors are close-on-exec again (no server ever inherits them)."""
        for fd in self._fds:
            os.set_inheritable(fd, False)

    def release(self) -> None:
        if not self._fds:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fds[-1], 0)  # a reader sees no owner rather than a stale one
        for fd in self._fds:
            os.close(fd)  # closing the only descriptors drops the locks
        self._fds = []


def _inherited(state_dir: Path) -> list[int] | None:
    """The locked descriptors of ``state_dir`` (the directory's, then daemon.lock's; or daemon.lock's alone)
    that the program before an upgrade's exec handed over in $LAUNCHER_LOCK_FDS; None when there are none
    or they are not this directory's (they are closed then, and the directory claimed as usual)."""
    fds = handed_fds(LOCK_FDS_ENV)
    if fds is None:
        return None
    try:
        found = [os.fstat(fd) for fd in fds]
        wanted = [os.stat(state_dir), os.stat(StateDir(state_dir).lock_file)][-len(fds) :]
    except OSError:
        return None
    if not 1 <= len(fds) <= 2 or [(f.st_dev, f.st_ino) for f in found] != [(w.st_dev, w.st_ino) for w in wanted]:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        return None
    for fd in fds:
        os.set_inheritable(fd, False)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held already by this open file: it cannot block
    return fds


def _me(url: str) -> Owner:
    import psutil  # only for a daemon that starts: not on the path of every command

    me = psutil.Process()
    return Owner(pid=me.pid, create_time=me.create_time(), url=url)


def _lock(fd: int, state_dir: Path, *, required: bool) -> bool:
    """flock ``fd`` or raise OwnedError naming the daemon that holds it. False when this filesystem cannot
    lock it (only where not ``required``; otherwise the OSError is raised)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = read_owner(state_dir)
        who = holder.describe() if holder is not None else "another daemon"
        raise OwnedError(
            f"{who} owns the state directory {state_dir}",
            hint="act through it (`launcher status`, `up`, `down`), or give this one its own daemon.state_dir",
        ) from None
    except OSError:
        if required:
            raise
        return False
    return True


def unanswered(owner: Owner, url: str) -> LauncherError:
    """The error for a daemon that owns the state directory but does not answer where it was asked."""
    return LauncherError(
        f"a daemon (pid {owner.pid}) owns this state directory but does not answer at {url}",
        hint=f"it may be starting or stuck: try again, check `journalctl`/its log, or stop pid {owner.pid}"
        + (f"; it listens at {owner.url}" if owner.url != url else ""),
    )
