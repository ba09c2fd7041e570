"""The shipped unit under the real systemd: PID 1 of its own PID, mount and cgroup namespace, driven by
systemctl, on both cgroup layouts machines have (pure cgroup2, and hybrid: v1 hierarchies with cgroup2 at
`unified` under a tmpfs).

The unit is systemd/launcher.service with only what a test needs changed (see `unit_for_test`): it runs as
root with its files in tmp_path and a short watchdog. Everything the test starts lives in the namespace,
and the namespace goes with the unshare process at the end. systemd gets a /sys/fs/cgroup of its own
(`CgroupLayout`): the host's may be a read-only tmpfs, where a directory systemd made could never be
removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

import launcher
from tests.conftest import MARK, ConfigWriter, marked_processes, poll_until

REPO = Path(launcher.__file__).resolve().parent.parent
SHIPPED_UNIT = REPO / "systemd" / "launcher.service"
SYSTEMD = Path("/lib/systemd/systemd")
CGROUP_ROOT = Path("/sys/fs/cgroup")
WAIT_S = 30.0

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="runs systemd as PID 1 of a namespace: needs root"),
    pytest.mark.skipif(not SYSTEMD.exists(), reason=f"no systemd binary at {SYSTEMD}"),
    pytest.mark.skipif(not shutil.which("unshare") or not shutil.which("nsenter"), reason="needs unshare and nsenter"),
]


def rewrite_unit(text: str, changes: dict[str, dict[str, str | None]]) -> str:
    """``text`` with keys of a section replaced (every line of a key given more than once, like
    DeviceAllow=, goes), removed (None) or added at the end of the section."""
    lines: list[str] = []
    section = ""
    pending: dict[str, str | None] = {}

    def flush() -> None:
        lines.extend(f"{key}={value}" for key, value in pending.items() if value is not None)

    for line in text.splitlines():
        if line.startswith("["):
            flush()
            section = line.strip("[]")
            pending = dict(changes.get(section, {}))
            lines.append(line)
            continue
        key = line.split("=", 1)[0] if "=" in line and not line.startswith("#") else None
        if key is not None and key in changes.get(section, {}):
            value = pending.pop(key, None)
            if value is not None:
                lines.append(f"{key}={value}")
            continue
        lines.append(line)
    flush()
    return "\n".join(lines) + "\n"


def unit_for_test(config: Path, tmp_path: Path, mark: str) -> str:
    """The shipped unit, run by root with its files in tmp_path: the rest (notify, watchdog, kill mode,
    restart, hardening, the system call filter) is what users get."""
    return rewrite_unit(
        SHIPPED_UNIT.read_text(),
        {
            "Unit": {"After": None, "Wants": None, "DefaultDependencies": "no"},
            "Service": {
                "ExecStart": f"{sys.executable} -m launcher --config {config} serve",
                "WatchdogSec": "2",
                "RestartSec": "100ms",
                "User": None,  # root: the test machine has no `launcher` user (nor always a render group)
                "Group": None,
                "SupplementaryGroups": None,
                "StateDirectory": None,  # /var/lib is the host's: the state directory is in tmp_path
                "PrivateTmp": "false",  # tmp_path is under /tmp
                "ReadWritePaths": str(tmp_path),
                "Environment": f'"PYTHONPATH={REPO}" "{MARK}={mark}"',
                "StandardOutput": f"append:{tmp_path / 'daemon.log'}",
                "StandardError": "inherit",
            },
        },
    )


@dataclass(frozen=True)
class Hierarchy:
    """One cgroup hierarchy mounted on the host, and where this process is in it."""

    kind: str  # "cgroup2" or "cgroup" (v1)
    options: str  # a v1 hierarchy's controllers or name=..., as /proc/self/cgroup names it ("" for v2)
    own_dir: Path  # this process's cgroup, as a directory of the host's mount

    def test_dir(self) -> Path:
        return self.own_dir / f"launcher-test-{os.getpid()}"


def host_hierarchies() -> list[Hierarchy]:
    """The cgroup hierarchies mounted on the host (/proc/self/mountinfo), each with this process's cgroup in
    it (/proc/self/cgroup)."""
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        own[controllers] = path
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, after = line.partition(" - ")
        root, mount_point = fields.split()[3:5]
        fstype, _, super_options = after.split()
        if fstype == "cgroup2":
            options = ""
        elif fstype == "cgroup":
            options = ",".join(o for o in super_options.split(",") if o not in ("rw", "ro", "relatime", "none"))
        else:
            continue
        within = own.get(options)
        if within is not None and (within + "/").startswith(root.rstrip("/") + "/"):
            relative = within[len(root.rstrip("/")) :].lstrip("/")
            found.append(Hierarchy(fstype, options, Path(mount_point) / relative))
    return found


def controller_bindings() -> list[tuple[str, str]]:
    """Each controller and the hierarchy it is bound to now (/proc/cgroups: 0 is cgroup2)."""
    rows = [line.split() for line in Path("/proc/cgroups").read_text().splitlines()[1:]]
    return [(row[0], row[1]) for row in rows]


def remove_tree(top: Path) -> None:
    """rmdir a cgroup and every cgroup under it, the deepest first. A cgroup whose last process just died
    stays busy for a moment: retried, bounded."""
    deadline = time.monotonic() + 5.0
    while top.exists() and time.monotonic() < deadline:
        for path in sorted((Path(d) for d, _, _ in os.walk(top)), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                path.rmdir()
        time.sleep(0.05)


def _inherit_cpuset(hierarchy: Hierarchy) -> None:
    """A new v1 cpuset cgroup has no CPUs and no memory nodes, and takes no process until it has both:
    it gets its parent's."""
    if "cpuset" in hierarchy.options.split(","):
        for name in ("cpuset.cpus", "cpuset.mems"):
            (hierarchy.test_dir() / name).write_text((hierarchy.own_dir / name).read_text())


class CgroupLayout:
    """A /sys/fs/cgroup of the namespace's own, so systemd writes nothing into the host's: in every
    hierarchy it may use, the namespace starts in a cgroup made for the test (and, with a cgroup
    namespace, sees it as its root); its mounts are its own (a private mount namespace).

    ``cgroup2``: the host's cgroup2 hierarchy mounted at /sys/fs/cgroup (systemd runs unified).
    ``hybrid``: a private tmpfs at /sys/fs/cgroup with the host's cgroup2 at `unified` and its v1
    name=systemd hierarchy at `systemd` (systemd runs hybrid and mounts the v1 controllers it wants into
    the private tmpfs).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        hierarchies = host_hierarchies()
        if not any(h.kind == "cgroup2" for h in hierarchies):
            pytest.skip("the host has no cgroup2 hierarchy mounted: systemd cannot be given one")
        if kind == "hybrid" and not any(h.options == "name=systemd" for h in hierarchies):
            pytest.skip("the host has no v1 name=systemd hierarchy (pure cgroup2): a hybrid layout would create one")
        # cgroup2 alone uses no v1 hierarchy; hybrid may put cgroups in every v1 hierarchy the host has.
        self.hierarchies = [h for h in hierarchies if kind == "hybrid" or h.kind == "cgroup2"]
        self.made: list[Path] = []
        for hierarchy in self.hierarchies:
            try:
                hierarchy.test_dir().mkdir()
                self.made.append(hierarchy.test_dir())
                _inherit_cpuset(hierarchy)
            except OSError as exc:
                self.remove()
                pytest.skip(f"cannot make a cgroup for the test in {hierarchy.own_dir}: {exc.strerror}")

    def script(self, inside: str) -> str:
        """Shell that moves itself into the test's cgroups, enters the namespaces, mounts what the
        namespace's systemd finds at /sys/fs/cgroup and runs ``inside`` (which has no single quote)."""
        enter = " && ".join(f"echo $$ > {d}/cgroup.procs" for d in self.made)
        if self.kind == "cgroup2":
            mounts = "mount -t cgroup2 cgroup2 /sys/fs/cgroup"
        else:
            mounts = (
                "mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup && mkdir /sys/fs/cgroup/unified /sys/fs/cgroup/systemd"
                " && mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified"
                " && mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd"
            )
        unshare = "unshare --cgroup --pid --fork --mount --uts --ipc --mount-proc"
        return f"{enter} && exec {unshare} sh -c '{mounts} && {inside}'"

    def remove(self) -> None:
        for made in self.made:
            remove_tree(made)

    def left(self) -> list[Path]:
        return [made for made in self.made if made.exists()]


class Namespace:
    """systemd as PID 1 of a new PID, mount, cgroup, UTS and IPC namespace, with /run and /sys/fs/cgroup
    its own."""

    def __init__(self, tmp_path: Path, units: dict[str, str], env: dict[str, str], cgroups: CgroupLayout) -> None:
        self.units_dir = tmp_path / "units"
        self.units_dir.mkdir()
        for name, text in units.items():
            (self.units_dir / name).write_text(text)
        (self.units_dir / "test.target").write_text("[Unit]\nDefaultDependencies=no\n")
        inside = (
            "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system && "
            f"cp {self.units_dir}/* /run/systemd/system/ && "
            f"exec {SYSTEMD} --system --unit=test.target --log-target=console --log-level=warning"
        )
        self.proc = subprocess.Popen(
            ["sh", "-c", cgroups.script(inside)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=(tmp_path / "systemd.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killed as one at the end
        )
        self.layout = cgroups.kind
        self.pid = self._init_pid()

    def _init_pid(self) -> int:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            for child in psutil.Process(self.proc.pid).children():
                if Path(f"/proc/{child.pid}/root/run/systemd/private").exists():
                    return child.pid
            assert self.proc.poll() is None, "systemd exited at once"
            time.sleep(0.05)
        raise AssertionError("systemd never opened its private socket")

    def systemctl(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", "-p", "systemctl", *args],
            capture_output=True,
            text=True,
            timeout=WAIT_S,
            stdin=subprocess.DEVNULL,
        )
        assert not check or result.returncode == 0, result.stderr
        return result.stdout

    def show(self, unit: str) -> dict[str, str]:
        keys = "ActiveState,SubState,StatusText,MainPID,NRestarts,ControlGroup,Result"
        out = self.systemctl("show", unit, f"--property={keys}")
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_show(self, unit: str, what: str, predicate: Callable[[dict[str, str]], bool]) -> dict[str, str]:
        return poll_until(lambda: self.show(unit), predicate, f"{unit} ({what})", WAIT_S)

    def mountinfo(self) -> list[str]:
        return Path(f"/proc/{self.pid}/mountinfo").read_text().splitlines()

    def host_pid(self, ns_pid: int) -> int:
        """The host's pid of the namespace's process ``ns_pid`` (the last NSpid of /proc/PID/status)."""
        for proc in psutil.Process(self.pid).children(recursive=True):
            with contextlib.suppress(OSError, StopIteration):
                status = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                if int(next(line for line in status if line.startswith("NSpid:")).split()[-1]) == ns_pid:
                    return proc.pid
        raise AssertionError(f"no process {ns_pid} in the namespace")

    def close(self) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired, AssertionError):
            self.systemctl("exit", check=False)
            self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left of the namespace goes with its PID 1
        self.proc.wait(10)


@pytest.fixture(params=["cgroup2", "hybrid"])
def namespace(
    request: pytest.FixtureRequest, tmp_path: Path, marked_env: dict[str, str]
) -> Iterator[Callable[[dict[str, str]], Namespace]]:
    bindings = controller_bindings()
    tmpfs_entries = set(os.listdir(CGROUP_ROOT)) if CGROUP_ROOT.is_dir() else set()
    cgroups = CgroupLayout(request.param)
    spaces: list[Namespace] = []

    def start(units: dict[str, str]) -> Namespace:
        spaces.append(Namespace(tmp_path, units, marked_env, cgroups))
        return spaces[-1]

    try:
        yield start
    finally:
        for space in spaces:
            space.close()
        cgroups.remove()
    # What the test can promise of the host: the cgroups it made are gone with everything systemd made in
    # them, nothing new is in the host's /sys/fs/cgroup, and every controller is bound where it was.
    assert not cgroups.left(), f"cgroups left behind: {cgroups.left()}"
    assert set(os.listdir(CGROUP_ROOT)) == tmpfs_entries
    assert controller_bindings() == bindings


def server_pids(config: Path) -> list[int]:
    port = yaml.safe_load(config.read_text())["daemon"]["port"]
    body = httpx.get(f"http://127.0.0.1:{port}/instances", timeout=10).json()
    return [i["pid"] for i in body if i["pid"] is not None]


def test_the_shipped_unit_under_systemd(
    write_config: ConfigWriter,
    llama_server: Path,
    tmp_path: Path,
    namespace: Callable[[dict[str, str]], Namespace],
    leaves_no_process: str,
) -> None:
    config = write_config({"tiny": {"autostart": True, "binary": str(llama_server)}}, daemon={"ready_when": "loaded"})
    space = namespace({"launcher.service": unit_for_test(config, tmp_path, leaves_no_process)})
    # The layout systemd was given: what is mounted at /sys/fs/cgroup in its mount namespace.
    mounts = {m.split(" - ")[0].split()[4]: m.split(" - ")[1].split()[0] for m in space.mountinfo()}
    if space.layout == "hybrid":
        assert (mounts["/sys/fs/cgroup"], mounts["/sys/fs/cgroup/unified"]) == ("tmpfs", "cgroup2")
    else:
        assert mounts["/sys/fs/cgroup"] == "cgroup2"

    # Type=notify: `systemctl start` returns once READY=1 came, and with ready_when: loaded that is once
    # the model serves.
    space.systemctl("start", "launcher.service")
    shown = space.show("launcher.service")
    assert (shown["ActiveState"], shown["SubState"]) == ("active", "running")
    assert shown["StatusText"].startswith("1/1 ready"), shown
    first_daemon = int(shown["MainPID"])
    (server_ns_pid,) = server_pids(config)
    first_server = psutil.Process(space.host_pid(server_ns_pid))  # is_running() tells a reused pid apart

    # A frozen daemon stops feeding the watchdog: systemd aborts it, its server goes with it, and the
    # unit is restarted with a new daemon and a new server.
    os.kill(space.host_pid(first_daemon), signal.SIGSTOP)
    shown = space.wait_show(
        "launcher.service",
        "restarted after the watchdog",
        lambda s: s["NRestarts"] == "1" and s["SubState"] == "running",
    )
    assert int(shown["MainPID"]) != first_daemon
    assert not first_server.is_running()
    daemon_log = (tmp_path / "daemon.log").read_text()
    assert "Fatal Python error: Aborted" in daemon_log  # SIGABRT, with every thread's stack (faulthandler)

    # kill -9 of the daemon: its server dies with it (parent-death signal, then KillMode's SIGKILL to the
    # cgroup), and systemd restarts the unit.
    second_daemon = int(shown["MainPID"])
    (server_ns_pid,) = server_pids(config)
    second_server = psutil.Process(space.host_pid(server_ns_pid))
    os.kill(space.host_pid(second_daemon), signal.SIGKILL)
    shown = space.wait_show(
        "launcher.service", "restarted after kill -9", lambda s: s["NRestarts"] == "2" and s["SubState"] == "running"
    )
    assert not second_server.is_running()

    stop = space.systemctl("stop", "launcher.service")
    assert stop == ""
    shown = space.show("launcher.service")
    assert shown["ActiveState"] == "inactive"
    # Nothing of the unit is left: only the namespace itself (unshare and systemd) carries the mark.
    assert {p.pid for p in marked_processes(leaves_no_process)} == {space.proc.pid, space.pid}


def test_systemctl_reload_applies_an_edited_file(
    write_config: ConfigWriter,
    llama_server: Path,
    tmp_path: Path,
    namespace: Callable[[dict[str, str]], Namespace],
    leaves_no_process: str,
) -> None:
    """The unit's ExecReload= (SIGHUP): the edited file is applied by the running daemon, whose kept model
    keeps its server; the daemon is the same process."""
    tiny = {"autostart": True, "binary": str(llama_server)}
    config = write_config({"kept": tiny}, daemon={"ready_when": "loaded"})
    space = namespace({"launcher.service": unit_for_test(config, tmp_path, leaves_no_process)})
    space.systemctl("start", "launcher.service")
    daemon_pid = space.show("launcher.service")["MainPID"]
    (kept_pid,) = server_pids(config)
    port = yaml.safe_load(config.read_text())["daemon"]["port"]

    write_config({"kept": tiny, "added": tiny}, daemon=yaml.safe_load(config.read_text())["daemon"])
    space.systemctl("reload", "launcher.service")

    def instances() -> dict[str, dict[str, object]]:
        body = httpx.get(f"http://127.0.0.1:{port}/instances", timeout=10).json()
        return {i["name"]: i for i in body}

    now = poll_until(instances, lambda i: i.get("added", {}).get("state") == "ready", "added ready", WAIT_S)
    assert now["kept"]["pid"] == kept_pid and now["kept"]["restarts"] == 0
    shown = space.show("launcher.service")
    assert (shown["MainPID"], shown["ActiveState"], shown["NRestarts"]) == (daemon_pid, "active", "0")
    space.systemctl("stop", "launcher.service")
    assert {p.pid for p in marked_processes(leaves_no_process)} == {space.proc.pid, space.pid}
