"""`launcher service install`: the unit for this installation, written under a target root in tmp_path."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from launcher.config_file import load_settings
from launcher.errors import ConfigError
from launcher.service import install
from tests.conftest import run_cli


def service_env(marked_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return marked_env | {"LAUNCHER_SERVICE_ROOT": str(tmp_path / "root"), "XDG_CONFIG_HOME": str(tmp_path / "home")}


def exec_start(unit: Path) -> list[str]:
    (line,) = [line for line in unit.read_text().splitlines() if line.startswith("ExecStart=")]
    return line.removeprefix("ExecStart=").split()


def test_system_install_writes_unit_user_and_config(marked_env: dict[str, str], tmp_path: Path) -> None:
    env = service_env(marked_env, tmp_path)
    result = run_cli("service", "install", env=env)
    assert result.returncode == 0, result.stderr
    root = tmp_path / "root"
    unit = root / "etc/systemd/system/launcher.service"
    executable, *args = exec_start(unit)
    assert os.access(executable, os.X_OK)  # this installation's launcher
    assert args == ["--config", "/etc/launcher/launcher.yaml", "serve"]  # the path on the system, not the root's
    assert "WatchdogSec=30" in unit.read_text()  # the shipped unit, ExecStart aside
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit.read_text()  # `systemctl reload` reloads the configuration
    assert "u launcher" in (root / "etc/sysusers.d/launcher.conf").read_text()
    config = root / "etc/launcher/launcher.yaml"
    assert load_settings(config).models == {}  # the example loads as it is
    assert result.stdout.splitlines()[-3:] == [
        "  systemd-sysusers",
        "  systemctl daemon-reload",
        "  systemctl enable --now launcher",
    ]

    config.write_text("daemon: {port: 9000}\n")
    again = run_cli("service", "install", env=env)
    assert again.returncode == 0
    assert f"kept {config}" in again.stdout
    assert config.read_text() == "daemon: {port: 9000}\n"  # a user's configuration is never replaced


def test_user_install_goes_to_the_config_home(marked_env: dict[str, str], tmp_path: Path) -> None:
    result = run_cli("service", "install", "--user", env=service_env(marked_env, tmp_path))
    assert result.returncode == 0, result.stderr
    home = tmp_path / "home"
    assert exec_start(home / "systemd/user/launcher.service")[1:] == [
        "--config",
        str(home / "launcher/launcher.yaml"),
        "serve",
    ]
    assert (home / "launcher/launcher.yaml").is_file()
    assert "systemctl --user enable --now launcher" in result.stdout
    assert not (tmp_path / "root").exists()


def test_print_writes_nothing(marked_env: dict[str, str], tmp_path: Path) -> None:
    result = run_cli("service", "install", "--print", env=service_env(marked_env, tmp_path))
    assert result.returncode == 0, result.stderr
    assert "ExecStart=" in result.stdout
    assert "--config /etc/launcher/launcher.yaml serve" in result.stdout
    assert "systemctl enable --now launcher" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_system_install_needs_root(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        install(user=False, print_only=False, root=tmp_path, config_home=tmp_path, is_root=False)
    assert caught.value.message == "a system service is installed by root"
    assert caught.value.exit_code == 2
    assert list(tmp_path.iterdir()) == []


def test_unwritable_target_is_one_line(marked_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "etc").write_text("a file where a directory should be")
    result = run_cli("service", "install", env=service_env(marked_env, tmp_path))
    assert result.returncode == 1
    assert result.stderr.startswith("launcher: cannot write ")
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze")
def test_installed_unit_verifies(marked_env: dict[str, str], tmp_path: Path) -> None:
    assert run_cli("service", "install", env=service_env(marked_env, tmp_path)).returncode == 0
    unit = tmp_path / "root/etc/systemd/system/launcher.service"
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
