"""Reading the configuration: the file's search order, YAML, the environment's overrides, path
resolution, and errors that name the file, the key and what was expected.

Search order for the file: --config, $LAUNCHER_CONFIG, ./launcher.yaml, ~/.config/launcher/launcher.yaml,
/etc/launcher/launcher.yaml. Daemon and GPU settings can be overridden from the environment
(LAUNCHER_DAEMON__PORT=9000); the environment wins over the file. Relative paths in the file are
relative to the file's folder, and every path is shown normalised (no `..`).

The environment is read by pydantic-settings (launcher/config_env.py), imported only when a
LAUNCHER_DAEMON__* or LAUNCHER_GPUS__* variable is set: its import costs about 90 ms.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from launcher.config import Settings
from launcher.config_daemon import DaemonSettings
from launcher.config_yaml import clip, collector_paused, parse_config_yaml, read_config_text, shown
from launcher.errors import ConfigError

log = logging.getLogger("launcher")


def read_token(path: Path | None, key: str = "daemon.token_file") -> str | None:
    """The token in the file the configuration's ``key`` names (None when none is configured)."""
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {key} {path}: {exc.strerror}") from None
    if not token:
        raise ConfigError(f"{key} {path} is empty")
    return token


def secret_file_problem(path: Path) -> str | None:
    """Why ``path`` is no place for a secret, judged as ssh judges a private key: a file of the user's own
    must be open to the user alone; one another user owns (root, where Kubernetes mounts a Secret for the
    pod's fsGroup) may be readable by its group, never by others. None when it is fine, or cannot be seen
    (reading it says why)."""
    try:
        status = path.stat()
    except OSError:
        return None
    ours = status.st_uid == os.geteuid()
    open_bits = status.st_mode & (0o077 if ours else 0o007)
    if not open_bits:
        return None
    how = "readable" if open_bits & 0o044 else "writable"
    who = "others" if open_bits & 0o007 else "its group"
    fix = f"chmod 600 {path}" if ours else f"chmod o-rwx {path}"
    return f"{path} is {how} by {who} (mode {stat.S_IMODE(status.st_mode):04o}): run {fix}"


def _check_secret_files(files: dict[str, Path | None], daemon: DaemonSettings, where: str) -> None:
    """Refuse a token file others can read, or warn where daemon.allow_readable_secrets accepts it."""
    for key, file in files.items():
        problem = secret_file_problem(file) if file is not None else None
        if problem is None:
            continue
        if not daemon.allow_readable_secrets:
            raise ConfigError(f"{where}: {key}: {problem}")
        log.warning("%s: %s: %s (accepted: daemon.allow_readable_secrets is true)", where, key, problem)


def search_path(explicit: Path | None) -> list[Path]:
    """The files looked at, in order; the first that exists is used."""
    if explicit is not None:
        return [explicit]
    candidates = [Path("launcher.yaml"), Path.home() / ".config/launcher/launcher.yaml"]
    candidates.append(Path("/etc/launcher/launcher.yaml"))
    from_env = os.environ.get("LAUNCHER_CONFIG")
    return [Path(from_env), *candidates] if from_env else candidates


def find_config(explicit: Path | None) -> Path | None:
    paths = search_path(explicit)
    if explicit is not None or os.environ.get("LAUNCHER_CONFIG"):
        # A file that was named must exist; falling back silently would run the wrong setup.
        if not paths[0].is_file():
            raise ConfigError(f"configuration file {paths[0]} does not exist")
        return paths[0]
    return next((p for p in paths if p.is_file()), None)


def load_settings(explicit: Path | None = None, *, required: bool = True) -> Settings:
    """Find, read and validate the configuration. Raises ConfigError with file, key and expectation."""
    path = find_config(explicit)
    if path is None:
        if required:
            looked = ", ".join(str(p) for p in search_path(None))
            raise ConfigError(
                f"no configuration file found (looked at {looked})",
                hint="pass --config FILE (examples: configs/ in the source, or what `launcher service install` writes)",
            )
        return default_settings()
    return _validate(_read_yaml(path), path)


def load_daemon_settings(explicit: Path | None = None) -> DaemonSettings:
    """Only the `daemon:` section, with its environment overrides: what a command that talks to the daemon
    needs (where it listens, its token, its state directory). The rest is the daemon's to validate."""
    path = find_config(explicit)
    data = _read_yaml(path, section="daemon") if path is not None else {}
    sources: dict[str, str] = {}
    section = _with_environment({"daemon": data.get("daemon") or {}}, sources)["daemon"]
    try:
        daemon = DaemonSettings.model_validate(section)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, sources, within="daemon")) from None
    daemon = _resolve_daemon(daemon, _base(path))
    _check_secret_files({"daemon.token_file": daemon.token_file}, daemon, str(path or "configuration"))
    return daemon


def default_settings() -> Settings:
    """Every default, no model: what the CLI uses to reach a daemon when no file is found."""
    return _validate({}, None)


def parse_settings(text: str, path: Path) -> Settings:
    """Validate configuration text as if it were read from ``path`` (used by tests and doctor)."""
    return _validate(_parse_yaml(text, path), path)


def _read_yaml(path: Path, section: str | None = None) -> dict[str, Any]:
    return _parse_yaml(read_config_text(path), path, section)


def _parse_yaml(text: str, path: Path, section: str | None = None) -> dict[str, Any]:
    data = parse_config_yaml(text, path, section)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with daemon, gpus and models at the top")
    return data


# Sections the environment may set, as LAUNCHER_<SECTION>__<KEY>[__<KEY>...].
_ENV_PREFIX = "LAUNCHER_"
_ENV_SECTIONS = ("daemon", "gpus")


def _with_environment(data: dict[str, Any], sources: dict[str, str]) -> dict[str, Any]:
    """``data`` with the environment's settings laid over it, read by pydantic-settings (a value for a
    list or mapping is JSON: LAUNCHER_DAEMON__INSTANCE_PORTS='[9000, 9099]'). ``sources`` gets each dotted
    key set and its variable. pydantic-settings costs about 90 ms to import, more than the rest of a
    `launcher status` together, so it is imported only when a section's variable is set."""
    sections = {f"{_ENV_PREFIX}{section}".upper() for section in _ENV_SECTIONS}
    variables = {name: value for name, value in os.environ.items() if name.upper().split("__")[0] in sections}
    if not variables:
        return data
    from launcher.config_env import read_environment

    overrides = read_environment(variables)
    for variable in variables:
        sources[".".join(variable.removeprefix(_ENV_PREFIX).lower().split("__"))] = variable
    return _laid_over(data, overrides)


def _laid_over(below: dict[str, Any], above: dict[str, Any]) -> dict[str, Any]:
    """``below`` with ``above``'s keys in place of its own, mappings merged key by key."""
    merged = dict(below)
    for key, value in above.items():
        inner = merged.get(key)
        if isinstance(inner, dict) and isinstance(value, dict):
            value = _laid_over(inner, value)
        merged[key] = value
    return merged


def _validate(data: dict[str, Any], path: Path | None) -> Settings:
    sources: dict[str, str] = {}
    try:
        with collector_paused():
            settings = _resolve_paths(Settings(**_with_environment(data, sources)), path)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, sources)) from None
    secrets = {"daemon.token_file": settings.daemon.token_file, "hub.token_file": settings.hub.token_file}
    secrets.update({f"peers.{i}.token_file": peer.token_file for i, peer in enumerate(settings.peers)})
    _check_secret_files(secrets, settings.daemon, str(path or "configuration"))
    return settings


# Pydantic names the member of a union that failed (`literal['auto']`, `constrained-int`) in the
# error location; users know keys, not union members.
_UNION_MEMBER = re.compile(r"^(literal\[.*\]|constrained-\w+|list\[.*\]|dict\[.*\]|int|str|float|bool)$")


# What an error shows, however large the configuration: each message cut, and the first problems only.
_MAX_MESSAGE = 400
_MAX_PROBLEMS = 20


def _describe(exc: ValidationError, path: Path | None, sources: dict[str, str], within: str = "") -> str:
    where = str(path) if path is not None else "configuration"
    by_key: dict[str, str] = {}
    auto_keys: set[str] = set()  # keys that also accept 'auto'
    for error in exc.errors():
        loc = [within] if within else []
        loc += [clip(str(p), 60) for p in error["loc"] if not _UNION_MEMBER.match(str(p))]
        key = ".".join(loc) or "(top level)"
        if error["type"] == "literal_error" and error.get("ctx", {}).get("expected") == "'auto'":
            auto_keys.add(key)
            continue
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        else:
            message = error["msg"].removeprefix("Value error, ").replace("Input should be", "should be")
            message = clip(message, _MAX_MESSAGE)
            if not isinstance(error.get("input"), dict) and error["type"] != "missing" and "(got " not in message:
                message = f"{message} (got {shown(error['input'])})"
        by_key.setdefault(key, message)
    for key in auto_keys:
        if key in by_key:
            by_key[key] = by_key[key].replace("should be", "should be 'auto' or", 1)
        elif not any(k.startswith(key + ".") for k in by_key):
            by_key[key] = "should be 'auto'"
    lines = [
        f"{where}: {key}{f' (from {sources[key]})' if key in sources else ''}: {message}"
        for key, message in by_key.items()
    ]
    if len(lines) > _MAX_PROBLEMS:
        lines[_MAX_PROBLEMS:] = [f"{where}: and {len(lines) - _MAX_PROBLEMS} more problems"]
    return "\n".join(lines)


def _base(path: Path | None) -> Path:
    """What relative paths in the configuration are relative to: the file's folder."""
    return path.parent.resolve() if path is not None else Path.cwd()


def _absolute(p: Path, base: Path) -> Path:
    # Lexically normalised, not resolved: a model that is a symlink (a Hugging Face cache) keeps its name.
    return Path(os.path.normpath(base / p.expanduser()))


def _resolve_daemon(daemon: DaemonSettings, base: Path) -> DaemonSettings:
    token_file = _absolute(daemon.token_file, base) if daemon.token_file else None
    return daemon.model_copy(update={"state_dir": _absolute(daemon.state_dir, base), "token_file": token_file})


def _resolve_paths(settings: Settings, path: Path | None) -> Settings:
    base = _base(path)

    def absolute(p: Path) -> Path:
        return _absolute(p, base)

    daemon = _resolve_daemon(settings.daemon, base)
    hub = settings.hub.model_copy(
        update={"token_file": absolute(settings.hub.token_file) if settings.hub.token_file else None}
    )
    models = {
        name: m.model_copy(
            update={
                # An Ollama model is a name, not a path.
                "model": absolute(m.model) if m.backend == "llama-server" and isinstance(m.model, Path) else m.model,
                "binary": absolute(m.binary) if m.binary else None,
                "ollama": m.ollama.model_copy(
                    update={"models_dir": absolute(m.ollama.models_dir) if m.ollama.models_dir else None}
                ),
            }
        )
        for name, m in settings.models.items()
    }
    peers = [
        p.model_copy(update={"token_file": absolute(p.token_file) if p.token_file else None}) for p in settings.peers
    ]
    return settings.model_copy(update={"daemon": daemon, "hub": hub, "models": models, "peers": peers, "source": path})
