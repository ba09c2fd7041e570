"""A server that cannot start says why, at once and everywhere, with the real llama-server.

`--no-mmap` is an option this llama-server no longer has (it became `--load-mode`): the configuration is
refused before anything starts, naming the option that replaced it. Where the binary cannot be asked (its
`--help` fails), the server is started, says `error: invalid argument: --no-mmap` and exits; the second
identical exit fails the instance at once, and that sentence is in the API, the event, `status` and `up`.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from launcher.backends import options
from launcher.backends.options import closest_option, options_in_help, server_options, unknown_option
from launcher.tinymodel import write_tiny_llama
from tests.conftest import MARK, ConfigWriter, Daemon, run_cli

NO_MMAP_ERROR = "error: invalid argument: --no-mmap"


def test_the_installed_llama_server_is_asked_for_its_options(llama_server: Path) -> None:
    options = server_options(llama_server)
    assert options is not None
    assert {"--ctx-size", "-c", "--load-mode", "--tensor-split", "-ngl"} <= set(options.descriptions)
    assert unknown_option(["-c", "512", "--seed", "-1", "--ctx-size=64", "-ngl", "99"], options) is None
    # Values that look like options: a key, a small negative number, a reverse prompt.
    assert unknown_option(["--api-key", "-Xy9secret", "--temp", "-1e-3", "-r", "- User:"], options) is None
    assert unknown_option(["-fa", "on", "--no-mmap"], options) == "--no-mmap"
    assert closest_option("--no-mmap", options) == "--load-mode"
    assert closest_option("--ctx-sise", options) == "--ctx-size"


def test_help_text_entries_and_their_descriptions() -> None:
    text = (
        "-t,    --threads N                      number of CPU threads\n"
        "-fa,   --flash-attn [on|off|auto]       set Flash Attention use\n"
        "                                        (env: LLAMA_ARG_FLASH_ATTN)\n"
        "--mmap, --no-mmap                       whether to memory-map the model\n"
        "\n"
        "  -H, --host HOST       host to bind to\n"
    )
    found = options_in_help(text)
    assert set(found.descriptions) == {"-t", "--threads", "-fa", "--flash-attn", "--mmap", "--no-mmap", "-H", "--host"}
    assert found.descriptions["--flash-attn"] == "set Flash Attention use (env: LLAMA_ARG_FLASH_ATTN)"
    assert found.descriptions["-H"] == "host to bind to"
    assert found.with_value == {"-t", "--threads", "-fa", "--flash-attn", "-H", "--host"}


def test_an_option_the_server_lacks_is_refused_at_load_with_the_one_that_replaced_it(
    write_config: ConfigWriter, marked_env: dict[str, str], llama_server: Path
) -> None:
    config = write_config({"tiny": {"args": ["--no-mmap"], "binary": str(llama_server)}})
    expected = (
        f"launcher: models.tiny.args: --no-mmap is not an option of this llama-server ({llama_server}); "
        "did you mean --load-mode?"
    )
    for command in (["serve"], ["up", "tiny"]):
        result = run_cli("--config", str(config), *command, env=marked_env)
        assert result.returncode == 2, result.stderr
        assert result.stderr.splitlines()[0] == expected
        assert "Traceback" not in result.stderr
    doctor = run_cli("--config", str(config), "doctor", env=marked_env)
    assert doctor.returncode == 1
    assert f"FAIL  args          {expected.removeprefix('launcher: ')}" in doctor.stdout


def test_a_server_that_cannot_start_fails_at_once_and_says_why_everywhere(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon], llama_server_without_help: Path
) -> None:
    restart = {"backoff_initial": 0.05, "backoff_max": 0.1, "burst": 10}
    model = {"args": ["--no-mmap"], "binary": str(llama_server_without_help), "restart": restart}
    daemon = start_daemon(write_config({"tiny": model}))

    up = daemon.cli("up", "tiny")
    assert up.returncode == 1
    assert f"launcher: tiny did not become ready: {NO_MMAP_ERROR}" in up.stderr.splitlines()  # after its progress

    shown = daemon.instance("tiny")
    assert (shown["state"], shown["restarts"], shown["last_error"]) == ("failed", 1, NO_MMAP_ERROR)
    assert NO_MMAP_ERROR in shown["log_tail"]
    exits = [e["message"] for e in shown["events"] if e["kind"] == "exit"]
    assert exits == [f"server exited with code 1: {NO_MMAP_ERROR}"] * 2
    assert shown["events"][-1]["message"] == "it failed to start twice in a row with the same error: not retried"

    status = daemon.cli("status")
    assert status.returncode == 0
    assert f"tiny: failed: {NO_MMAP_ERROR}" in status.stdout.splitlines()


def test_a_model_file_the_server_rejects_is_named_by_the_server(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon], tmp_path: Path
) -> None:
    broken = write_tiny_llama(tmp_path / "broken.gguf")
    with broken.open("r+b") as f:  # a sound header, but tensor data missing: llama-server exits at load
        f.truncate(broken.stat().st_size - 4096)
    daemon = start_daemon(write_config({"tiny": {"model": str(broken)}}))
    up = daemon.cli("up", "tiny")
    assert up.returncode == 1
    (said,) = [line for line in up.stderr.splitlines() if line.startswith("launcher: ")]
    assert said.startswith("launcher: tiny did not become ready: ")
    assert "failed to load model" in said
    assert daemon.instance("tiny")["state"] == "failed"


@pytest.mark.skipif(sys.platform != "linux", reason="names the holder from the kernel's socket table")
def test_a_port_taken_by_another_process_is_named(
    write_config: ConfigWriter, start_daemon: Callable[[Path], Daemon]
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        daemon = start_daemon(write_config({"tiny": {"port": port}}))
        up = daemon.cli("up", "tiny")
    assert up.returncode == 1
    (said,) = [line for line in up.stderr.splitlines() if line.startswith("launcher: ")]
    assert said.startswith(f"launcher: port {port} is already in use by ")


def test_a_binary_that_serves_instead_of_helping_is_stopped_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, leaves_no_process: str
) -> None:
    """A wrapper that ignores `--help` and starts a server (with a child of its own) is not waited for past
    the time allowed, and leaves nothing running: it cannot be asked, which is no error."""
    monkeypatch.setenv(MARK, leaves_no_process)  # what it starts is covered by the leftover check
    monkeypatch.setattr(options, "_HELP_TIMEOUT_S", 0.5)
    serves = tmp_path / "serves-forever"
    serves.write_text("#!/bin/sh\nsleep 300 &\nsleep 300\n")
    serves.chmod(0o755)
    assert options.server_options(serves) is None
