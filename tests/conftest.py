"""Shared fixtures: a real llama-server, generated models, configurations, and the leftover-process check.

Every process a test starts (daemon, servers, their children) carries LAUNCHER_TEST_MARK=<the test's
tmp_path> in its environment; after each test, no process with that mark may be alive.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import httpx
import psutil
import pytest
import yaml

from launcher.backends.llama_server import find_llama_server
from launcher.config import Settings
from launcher.config_daemon import DaemonSettings
from launcher.config_file import load_settings
from launcher.config_yaml import dump_config_yaml
from launcher.schema_gpus import GpuSample
from launcher.supervise.manager import Manager
from launcher.tinymodel import write_tiny_llama
from launcher.wiring import Wired, supervision

if TYPE_CHECKING:
    from playwright.sync_api import Browser

MARK = "LAUNCHER_TEST_MARK"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="session")
def llama_server() -> Path:
    return find_llama_server(None)


@pytest.fixture(scope="session")
def llama_server_without_help(llama_server: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real llama-server behind a script whose `--help` fails: a binary the launcher cannot ask for its
    options, so what it is given reaches the server."""
    path = tmp_path_factory.mktemp("bin") / "llama-server-no-help"
    path.write_text(f'#!/bin/sh\n[ "$1" = --help ] && exit 1\nexec {llama_server} "$@"\n')
    path.chmod(0o755)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny.gguf")


# The instance ports of this test run: a slice of 20000-29999 of its own, chosen by the run's pid, so that
# two runs on one machine (worktrees, CI beside a developer) rarely pick the same port at the same moment;
# every test of a run takes its ports from the slice's start, one test at a time.
_SLICE = 250
_FIRST = 20000 + os.getpid() % 40 * _SLICE
INSTANCE_PORTS = (_FIRST, _FIRST + _SLICE - 1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_port_run(count: int) -> int:
    """The first of ``count`` consecutive ports free now, below the kernel's ephemeral range (32768 and up),
    where no client connection of another process takes one in the meantime."""
    for base in range(30000 + os.getpid() % 500 * 4, 32768 - count, count):
        with contextlib.ExitStack() as held:
            try:
                for port in range(base, base + count):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
            return base
    raise AssertionError(f"no {count} consecutive free ports below 32768")


def marked_processes(mark: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARK) == mark and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.fixture(autouse=True)
def leaves_no_process(tmp_path: Path) -> Iterator[str]:
    """Fail a test that leaves any process it started; clean them up so later tests are not disturbed."""
    mark = str(tmp_path)
    yield mark
    left = marked_processes(mark)
    _, alive = psutil.wait_procs(left, timeout=2.0)  # a just-signalled process may still be exiting
    for proc in alive:
        proc.kill()
    assert not alive, f"processes left behind: {[(p.pid, p.info if hasattr(p, 'info') else p.name()) for p in alive]}"


@pytest.fixture
def marked_env(leaves_no_process: str) -> dict[str, str]:
    """The environment for a daemon or CLI subprocess of this test."""
    env = dict(os.environ)
    env[MARK] = leaves_no_process
    env.pop("LAUNCHER_CONFIG", None)
    return env


ConfigWriter = Callable[..., Path]


@pytest.fixture
def write_config(tmp_path: Path, tiny_model: Path, leaves_no_process: str) -> ConfigWriter:
    """Write a launcher.yaml into tmp_path. ``models`` maps names to overrides of a default model entry
    (an override of None drops that key)."""

    def write(models: dict[str, dict[str, Any]] | None = None, **top: Any) -> Path:
        entries = {}
        for name, overrides in (models or {"tiny": {}}).items():
            entry: dict[str, Any] = {"model": str(tiny_model), "ctx": 256, "port": "auto", "stop_timeout": 5}
            entry.update(overrides)
            entry["env"] = {MARK: leaves_no_process, **overrides.get("env", {})}
            entries[name] = {key: value for key, value in entry.items() if value is not None}
        daemon = {"port": free_port(), "state_dir": str(tmp_path / "state"), "instance_ports": list(INSTANCE_PORTS)}
        daemon.update(top.pop("daemon", {}))
        top.setdefault("gpus", {"backend": "none"})  # never the host's GPUs: a test names the GPUs it means
        path = tmp_path / "launcher.yaml"
        path.write_text(dump_config_yaml({"daemon": daemon, "models": entries, **top}))
        return path

    return write


def write_secret(path: Path, text: str) -> Path:
    """A token file as it should be: readable by its owner only (the launcher refuses one others can read)."""
    path.write_text(text)
    path.chmod(0o600)
    return path


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 60, prefix: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "launcher", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def stop_process(proc: subprocess.Popen[str], sig: signal.Signals = signal.SIGTERM, timeout: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(timeout)


READY_TIMEOUT_S = 60
T = TypeVar("T")


def gpu_sample(index: int, free_mib: int, *, time: float = 1.0, error: str | None = None) -> GpuSample:
    """A reading of a 1000 MiB stand-in GPU with ``free_mib`` free, taken at ``time`` (epoch seconds)."""
    return GpuSample(
        index=index,
        uuid=f"GPU-{index}",
        name="Stand-in",
        pci_bus_id=None,
        vendor="sim",
        time=time,
        memory_total_mib=1000,
        memory_free_mib=free_mib,
        error=error,
    )


def poll_until(fetch: Callable[[], T], predicate: Callable[[T], bool], what: str, timeout_s: float) -> T:
    """What ``fetch`` returns once ``predicate`` holds for it; AssertionError with the last one at the
    deadline. For state owned by another process (a daemon, systemd), which tells no one when it changes."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = fetch()
        if predicate(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} never matched; last: {value}")
        time.sleep(0.05)


def read_of_a_fifo(fifo: Path, read: Callable[[], T], timeout_s: float = 10) -> T:
    """What ``read()`` returns, which reads the FIFO ``fifo`` (made here in a file's place), within ``timeout_s``:
    a read that waits for a writer fails the test (a writer then comes, so that its thread ends)."""
    os.mkfifo(fifo)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reading = pool.submit(read)
        try:
            return reading.result(timeout=timeout_s)
        finally:
            if not reading.done():
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def assert_downloading(answer: httpx.Response, model: str) -> None:
    """``answer`` is the front door's while ``model``'s files download (a hub model's, an Ollama pull): 503
    with code `downloading`, the progress in its message, and Retry-After the time left (at most a minute)."""
    assert answer.status_code == 503, answer.text
    error = answer.json()["error"]
    assert error["code"] == "downloading" and error["message"].startswith(f"{model} is downloading: "), error
    assert 1 <= int(answer.headers["retry-after"]) <= 60, answer.headers


class Daemon:
    """``prefix`` runs it (and its CLI) elsewhere, e.g. in a network namespace (`ip netns exec NAME`)."""

    def __init__(self, config: Path, env: dict[str, str], prefix: Sequence[str] = ()) -> None:
        self.config = config
        self.env = env
        self.prefix = list(prefix)
        daemon = yaml.safe_load(config.read_text())["daemon"]
        self.url = DaemonSettings(port=daemon["port"], host=daemon.get("host", "127.0.0.1")).client_url
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "launcher", "--config", str(config), "serve"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.http = httpx.Client(base_url=self.url, timeout=30)
        self.log: collections.deque[str] = collections.deque(maxlen=200)
        self._wait_answering()

    def _wait_answering(self) -> None:
        # The daemon logs "listening on ..." once its API answers: wait for that line.
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if "listening on" in line:
                # From here its log is kept (the last lines, for a failing test to show) by a reader of
                # its own: a pipe nobody reads fills up and freezes a daemon that logs much.
                threading.Thread(target=self._keep_log, args=(self.proc.stdout,), daemon=True).start()
                return
        raise AssertionError(f"daemon exited with {self.proc.wait()} before listening")

    def _keep_log(self, stream: IO[str]) -> None:
        with contextlib.suppress(ValueError, OSError):  # closed by stop()
            for line in stream:
                self.log.append(line)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli("--config", str(self.config), *args, env=self.env, prefix=self.prefix)

    def instance(self, name: str) -> dict[str, Any]:
        body: dict[str, Any] = self.http.get(f"/instances/{name}").json()
        return body

    def wait_for(self, name: str, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        return poll_until(lambda: self.instance(name), predicate, name, READY_TIMEOUT_S)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        self.http.close()
        code = stop_process(self.proc, sig)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return code


@pytest.fixture
def start_daemon(marked_env: dict[str, str]) -> Iterator[Callable[[Path], Daemon]]:
    daemons: list[Daemon] = []

    def start(config: Path, prefix: Sequence[str] = ()) -> Daemon:
        daemons.append(Daemon(config, marked_env, prefix))
        return daemons[-1]

    yield start
    for d in daemons:
        d.stop()


def _executable(folder: Path, script: str) -> Path:
    """An executable that runs tests/standin/``script`` with this interpreter, usable as `binary:`."""
    path = folder / script.replace(".py", "-standin")
    path.write_text(f'#!/bin/sh\nexec {sys.executable} {Path(__file__).parent / "standin" / script} "$@"\n')
    path.chmod(0o755)
    return path


@pytest.fixture(scope="session")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _executable(tmp_path_factory.mktemp("bin"), "llama.py")


@pytest.fixture(scope="session")
def ollama_standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _executable(tmp_path_factory.mktemp("bin"), "ollama.py")


OpenWired = Callable[[Path | Settings], Awaitable[Wired]]
OpenManager = Callable[[Path | Settings], Awaitable[Manager]]


@pytest.fixture
async def open_wired() -> AsyncIterator[OpenWired]:
    """The daemon's parts wired as the daemon wires them (state directory lock, leftovers, GPU sampler,
    manager, router), each shut down at the end of the test (every server stopped, the lock released)."""
    async with contextlib.AsyncExitStack() as stack:

        async def open_one(config: Path | Settings) -> Wired:
            settings = config if isinstance(config, Settings) else load_settings(config)
            return await stack.enter_async_context(supervision(settings, lambda _event: None))

        yield open_one


@pytest.fixture
async def open_manager(open_wired: OpenWired) -> OpenManager:
    """`open_wired`'s manager."""

    async def open_one(config: Path | Settings) -> Manager:
        return (await open_wired(config)).manager

    return open_one


@pytest.fixture
def browser(leaves_no_process: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Browser]:
    """Headless chromium (Debian's, never Playwright's download). Its processes and Playwright's driver
    carry the test's mark: the leftover check proves them gone too."""
    if not Path(CHROMIUM).exists():
        pytest.skip("no chromium on this machine (scripts/setup installs Debian's package where apt-get can)")
    from playwright.sync_api import sync_playwright  # only the browser tests pay for its import

    monkeypatch.setenv(MARK, leaves_no_process)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()
