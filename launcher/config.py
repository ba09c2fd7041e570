"""Configuration: the root of the launcher's typed, validated settings (Settings) and the rules across
its sections. Each section's model is in its own module (config_daemon.py, config_model.py, ...); reading
them from the YAML file and the environment is launcher/config_file.py's job.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from launcher.config_daemon import DaemonSettings
from launcher.config_fields import StrictSettings
from launcher.config_gpus import GpuSettings
from launcher.config_hub import HubSettings
from launcher.config_model import ModelSettings
from launcher.config_router import RouterSettings
from launcher.config_rpc import PeerSettings, RpcSettings
from launcher.config_yaml import clip
from launcher.errors import NotFoundError

# What works everywhere a model's name goes: file names, URLs, Prometheus label values, shell words.
_MODEL_NAME_MAX = 64
_MODEL_NAME = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9._-]{{0,{_MODEL_NAME_MAX - 1}}}")


class Settings(StrictSettings):
    """Everything the launcher is configured with. Build it with `load_settings`."""

    daemon: DaemonSettings = Field(default_factory=DaemonSettings)
    gpus: GpuSettings = Field(default_factory=GpuSettings)
    models: dict[str, ModelSettings] = Field(
        default_factory=dict, description="The models and RPC workers, by name (which names logs, URLs and metrics)."
    )
    router: RouterSettings = Field(default_factory=RouterSettings)
    hub: HubSettings = Field(default_factory=HubSettings)
    rpc: RpcSettings = Field(default_factory=RpcSettings)
    peers: list[PeerSettings] = Field(
        default_factory=list, description="Other launchers, whose RPC workers and models this one may use."
    )
    source: Path | None = Field(default=None, exclude=True)

    @field_validator("peers")
    @classmethod
    def _each_peer_once(cls, value: list[PeerSettings]) -> list[PeerSettings]:
        urls = [peer.url for peer in value] + [peer.label for peer in value if peer.name is not None]
        twice = sorted({url for url in urls if urls.count(url) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} listed more than once")
        return value

    @model_validator(mode="after")
    def _hosts_are_peers(self) -> Settings:
        known = {ref for peer in self.peers for ref in (peer.url, peer.label)}
        for name, model in self.models.items():
            if model.hosts != "local" and model.backend != "llama-server":
                raise ValueError(f"models.{name}.hosts: only a llama-server can use peers' RPC devices")
            unknown = [ref for ref in model.hosts if ref not in known] if isinstance(model.hosts, list) else []
            if unknown:
                names = ", ".join(sorted(p.label for p in self.peers)) or "none"
                raise ValueError(f"models.{name}.hosts names {', '.join(unknown)}, not a peer (peers: {names})")
        return self

    @field_validator("models")
    @classmethod
    def _names(cls, value: dict[str, ModelSettings]) -> dict[str, ModelSettings]:
        owners: dict[str, str] = {}  # every name the front door answers to -> its model
        for name, model in value.items():
            # A model's name names its log file, its replicas (NAME@N), URL paths and metric labels; an alias
            # only has to be a word.
            if not _MODEL_NAME.fullmatch(name):
                length = f" ({len(name)} characters)" if len(name) > _MODEL_NAME_MAX else ""
                raise ValueError(
                    f"model name {clip(repr(name), 80)}{length} does not follow the rule for names: 1 to "
                    f"{_MODEL_NAME_MAX} ASCII letters, digits, '.', '_' or '-', not starting with '.' or '-'"
                )
            for each in (name, *model.aliases):
                if not each or any(c.isspace() for c in each):
                    raise ValueError(f"alias {each!r} of {name!r} must be a word without spaces")
                if owners.setdefault(each, name) != name:
                    raise ValueError(f"the name {each!r} is given to both {owners[each]!r} and {name!r}")
        return value

    def model(self, name: str) -> ModelSettings:
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(sorted(self.models)) or "none"
            raise NotFoundError(
                f"no model named {name!r} in the configuration", hint=f"configured models: {known}"
            ) from None
