"""The daemon's start and its edges: a stop during a hung first GPU reading, two starts racing for the
same memory, an unusable state directory, a bad --url, IPv6 hosts."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from launcher.config import Settings
from launcher.config_daemon import DaemonSettings
from launcher.config_file import load_settings
from launcher.daemon import Daemon
from launcher.errors import StartError
from launcher.gpu.sampler import Sampler, open_sampler
from launcher.gpu.sim import Hold, SimBackend
from launcher.schema_instances import State
from launcher.statedir.owner import read_owner
from tests.conftest import ConfigWriter, OpenManager, run_cli

SIM = {"backend": "sim", "sim": [{"name": "Sim", "memory_mib": 24576}]}


async def test_a_stop_during_a_hung_first_gpu_reading_ends_the_daemon(
    write_config: ConfigWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    hold = Hold()

    def hung_sampler(settings: Settings, sim_usage: Callable[[], Mapping[int, int]]) -> tuple[Sampler, str]:
        sampler, why = open_sampler(settings, sim_usage)
        assert isinstance(sampler.backend, SimBackend)
        sampler.backend.inject(0, hold=hold)  # the first reading never returns by itself
        return sampler, why

    monkeypatch.setattr("launcher.wiring.open_sampler", hung_sampler)
    settings = load_settings(write_config(gpus=SIM))
    daemon = Daemon(settings, autostart=False)
    running = asyncio.ensure_future(daemon.run_until_stopped())
    await hold.entered()  # the daemon owns its state directory and waits on the GPU
    assert read_owner(settings.daemon.state_dir) is not None
    daemon.request_stop(signal.SIGTERM)
    try:
        await asyncio.wait_for(running, 3)  # well before the first reading's own 5 s bound
    finally:
        hold.release()
    assert read_owner(settings.daemon.state_dir) is None  # the lock is let go


async def test_two_starts_racing_for_one_gpu_place_one(write_config: ConfigWriter, open_manager: OpenManager) -> None:
    # One 700 MiB GPU holds one tiny instance (512 MiB of driver overhead and a few MiB), not two.
    gpus: dict[str, Any] = {"backend": "sim", "margin_mib": 0, "sim": [{"name": "Sim", "memory_mib": 700}]}
    manager = await open_manager(write_config({"a": {}, "b": {}}, gpus=gpus))
    results = await asyncio.gather(manager.start("a"), manager.start("b"), return_exceptions=True)
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 1 and isinstance(refused[0], StartError)
    assert "needs" in refused[0].message and "usable there" in refused[0].message
    placed = [i for i in manager.instances.values() if i.active]
    assert len(placed) == 1 and placed[0].placement.gpus == (0,)
    assert [i.state for i in manager.instances.values() if not i.active] == [State.STOPPED]


def test_an_unusable_state_directory_is_one_line(
    write_config: ConfigWriter, marked_env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    config = write_config(daemon={"state_dir": str(tmp_path / "a-file" / "state")})
    result = run_cli("--config", str(config), "serve", env=marked_env)
    assert result.returncode == 2
    assert result.stderr.startswith(f"launcher: daemon.state_dir {tmp_path / 'a-file' / 'state'} cannot be used: ")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("url", ["http://localhost:abc", "http://127.0.0.1:99999", "http://[::1", "ftp://x"])
def test_a_bad_url_is_one_line(url: str, write_config: ConfigWriter, marked_env: dict[str, str]) -> None:
    result = run_cli("--config", str(write_config()), "--url", url, "status", env=marked_env)
    assert result.returncode == 2
    assert result.stderr.startswith(f"launcher: the daemon's URL {url!r} is not")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("host", "url", "client_url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8400", "http://127.0.0.1:8400"),
        ("::1", "http://[::1]:8400", "http://[::1]:8400"),
        ("::", "http://[::]:8400", "http://[::1]:8400"),
        ("0.0.0.0", "http://0.0.0.0:8400", "http://127.0.0.1:8400"),
    ],
)
def test_urls_of_the_daemon(host: str, url: str, client_url: str) -> None:
    daemon = DaemonSettings(host=host, port=8400)
    assert (daemon.url, daemon.client_url) == (url, client_url)


def test_a_closed_pipe_is_not_an_error(write_config: ConfigWriter, marked_env: dict[str, str]) -> None:
    import subprocess
    import sys

    config = write_config(gpus={"backend": "sim", "sim": [{"name": f"Sim {i}", "memory_mib": 1024} for i in range(64)]})
    command = [sys.executable, "-m", "launcher", "--config", str(config), "gpus", "--json"]
    with subprocess.Popen(command, env=marked_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.readline()  # `| head -1`
        proc.stdout.close()
        stderr = proc.stderr.read().decode()
        assert proc.wait(30) == 0
    assert "Traceback" not in stderr
