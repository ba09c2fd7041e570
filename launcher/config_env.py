"""The environment's overrides of the daemon and GPU settings, read by pydantic-settings'
EnvSettingsSource: LAUNCHER_<SECTION>__<KEY>[__<KEY>...], a value for a list or mapping read as JSON.
Imported only when such a variable is set (config_file.py), for pydantic-settings' import cost."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError
from pydantic_settings.sources import EnvSettingsSource

from launcher.config_daemon import DaemonSettings
from launcher.config_gpus import GpuSettings
from launcher.config_yaml import clip
from launcher.errors import ConfigError


class _Overridable(BaseSettings):
    """The sections the environment may set (the models and peers are the file's alone)."""

    model_config = SettingsConfigDict(env_prefix="LAUNCHER_", env_nested_delimiter="__")

    daemon: DaemonSettings = Field(default_factory=DaemonSettings)
    gpus: GpuSettings = Field(default_factory=GpuSettings)


class _GivenEnvironment(EnvSettingsSource):
    """EnvSettingsSource over the variables it is given rather than all of os.environ."""

    def __init__(self, variables: Mapping[str, str]) -> None:
        self._variables = dict(variables)
        super().__init__(_Overridable)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name.lower(): value for name, value in self._variables.items()}


# A value pydantic-settings could not decode; JSON nested past Python's recursion limit escapes its wrapping.
_UNREADABLE = (SettingsError, RecursionError)


def read_environment(variables: Mapping[str, str]) -> dict[str, Any]:
    """The settings ``variables`` set, as nested unvalidated data for the configuration's own validation
    (which names each key's variable). Raises ConfigError naming a variable whose value is not JSON where
    the key needs a list or mapping."""
    try:
        return _GivenEnvironment(variables)()
    except _UNREADABLE as exc:
        # Which variable: pydantic-settings names the section only. Read each alone to find it.
        for name, value in sorted(variables.items()):
            try:
                _GivenEnvironment({name: value})()
            except _UNREADABLE:
                raise ConfigError(f"environment {name}: not valid JSON: {clip(value, 80)!r}") from None
        raise ConfigError(f"environment: {exc}") from None
