"""`launcher service install`: the systemd unit for this installation, system-wide or for the user.

The units and the example configuration ship inside the package (launcher/data/; systemd/ in the
repository links to them), so an installed wheel has them. Only ExecStart changes: this installation's
`launcher` and the configuration's path. Everything is written under a target root (default `/`,
`$LAUNCHER_SERVICE_ROOT` in tests) and the user's config home, so nothing else is touched.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from launcher.errors import ConfigError, LauncherError

# The dedicated user (systemd-sysusers creates it, and the video and render groups if missing).
_SYSUSERS = """u launcher - "launcher: llama-server and Ollama supervisor" /var/lib/launcher
m launcher video
m launcher render
"""


@dataclass(frozen=True)
class Target:
    """Where a unit goes and what it runs."""

    unit: Path
    config: Path
    config_in_unit: Path  # the config's path on the running system (the target root is not in it)
    sysusers: Path | None  # system installs only
    commands: tuple[str, ...]  # what the user runs afterwards


def target(*, user: bool, root: Path, config_home: Path) -> Target:
    if user:
        return Target(
            unit=config_home / "systemd" / "user" / "launcher.service",
            config=config_home / "launcher" / "launcher.yaml",
            config_in_unit=config_home / "launcher" / "launcher.yaml",
            sysusers=None,
            commands=(
                "systemctl --user daemon-reload",
                "systemctl --user enable --now launcher",
                "loginctl enable-linger  # keeps it running after you log out",
            ),
        )
    return Target(
        unit=root / "etc" / "systemd" / "system" / "launcher.service",
        config=root / "etc" / "launcher" / "launcher.yaml",
        config_in_unit=Path("/etc/launcher/launcher.yaml"),
        sysusers=root / "etc" / "sysusers.d" / "launcher.conf",
        commands=("systemd-sysusers", "systemctl daemon-reload", "systemctl enable --now launcher"),
    )


def launcher_command() -> list[str]:
    """How to run this installation: the `launcher` beside this Python (a virtualenv), else on PATH, else
    this Python with `-m launcher`."""
    beside = Path(sys.executable).parent / "launcher"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("launcher")
    return [found] if found else [sys.executable, "-m", "launcher"]


def _quoted(word: str) -> str:
    """One word of an ExecStart line: % is systemd's specifier sign, and a space needs quotes."""
    word = word.replace("%", "%%")
    return f'"{word}"' if any(c in word for c in ' \t"\\') else word


def unit_text(*, user: bool, command: list[str], config: Path) -> str:
    name = "launcher-user.service" if user else "launcher.service"
    template = resources.files("launcher").joinpath("data", name).read_text()
    exec_start = " ".join(_quoted(w) for w in [*command, "--config", str(config), "serve"])
    lines = [f"ExecStart={exec_start}" if line.startswith("ExecStart=") else line for line in template.splitlines()]
    return "\n".join(lines) + "\n"


def example_config() -> str:
    return resources.files("launcher").joinpath("data", "example.yaml").read_text()


def install(*, user: bool, print_only: bool, root: Path, config_home: Path, is_root: bool) -> str:
    """Write the unit (and the config from the example when there is none); return what to tell the user.
    With ``print_only`` write nothing and return the unit and the commands."""
    where = target(user=user, root=root, config_home=config_home)
    unit = unit_text(user=user, command=launcher_command(), config=where.config_in_unit)
    then = "\n".join(f"  {command}" for command in where.commands)
    if print_only:
        return f"# {where.unit}\n{unit}\n# then run:\n{then}\n"
    if not user and not is_root:
        raise ConfigError(
            "a system service is installed by root", hint="run it with sudo, or `launcher service install --user`"
        )
    said = []
    try:
        for path, text in ((where.unit, unit), (where.sysusers, _SYSUSERS)):
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                said.append(f"wrote {path}")
        if not where.config.exists():
            where.config.parent.mkdir(parents=True, exist_ok=True)
            where.config.write_text(example_config())
            said.append(f"wrote {where.config} from the example: name your models there")
        else:
            said.append(f"kept {where.config}")
    except OSError as exc:
        raise LauncherError(
            f"cannot write {exc.filename}: {exc.strerror}", hint="check the permissions of that directory"
        ) from None
    return "\n".join([*said, "then run:", then]) + "\n"


def install_from_environment(*, user: bool, print_only: bool) -> str:
    """`install` for the command line: the target root from $LAUNCHER_SERVICE_ROOT (tests), else /."""
    root = Path(os.environ.get("LAUNCHER_SERVICE_ROOT", "/"))
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return install(user=user, print_only=print_only, root=root, config_home=config_home, is_root=os.geteuid() == 0)
