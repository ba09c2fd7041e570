"""The server seam: argv and environment from a model and its placement (the GPUs the child sees
included), the model file the planner reads, and a readiness probe."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import httpx

from launcher.config_model import ModelSettings
from launcher.errors import ConfigError
from launcher.gpu import visibility_env
from launcher.hub_ref import HubRef
from launcher.plan.estimate import ModelShape
from launcher.plan.gguf import ModelFileError, regular_problem
from launcher.plan.placement import Placement
from launcher.schema_plans import Plan, PlanCheck

# Variables that belong to the daemon's own relationship with systemd, never to a child: a child that
# inherits NOTIFY_SOCKET can tell systemd the daemon is ready or stopping (or feed its watchdog), and one
# that inherits JOURNAL_STREAM may write journald's format into its log file.
_DAEMON_ONLY_ENV = (
    "NOTIFY_SOCKET",
    "JOURNAL_STREAM",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)


@dataclass(frozen=True)
class Health:
    """What a health probe of a ready server found."""

    ok: bool
    reloading: bool = False  # the server dropped its model by itself and is loading it again: not a crash
    details: Mapping[str, int] = field(default_factory=dict)  # reported sizes, e.g. size_vram_bytes
    warning: str | None = None  # something the user should know (part of the model on the CPU)


@dataclass(frozen=True)
class LaunchSpec:
    argv: list[str]
    env: dict[str, str]  # the child's whole environment


class ServerBackend(Protocol):
    name: str

    def binary(self, model: ModelSettings) -> Path:
        """The executable to run; raises ConfigError when there is none."""
        ...

    def check_model(self, model: ModelSettings, name: str) -> None:
        """Raise ConfigError when the model cannot be there (a missing file)."""
        ...

    def model_file(self, model: ModelSettings) -> Path | None:
        """The GGUF file the planner reads, when it can be found."""
        ...

    def launch_spec(self, model: ModelSettings, port: int, placement: Placement) -> LaunchSpec: ...

    async def is_ready(self, client: httpx.AsyncClient, port: int, timeout_s: float) -> bool:
        """True when the server can serve requests (may start loading the model on the way)."""
        ...

    async def health(self, client: httpx.AsyncClient, port: int, timeout_s: float) -> Health:
        """Probe a ready server."""
        ...

    async def slots(self, client: httpx.AsyncClient, port: int, timeout_s: float) -> int:
        """How many requests a ready server works on at once (the front door queues the rest)."""
        ...

    def upstream_model(self) -> str | None:
        """The name the server knows the model by in an OpenAI request's `model`; None: any name does."""
        ...

    def check_plan(self, plan: Plan, log_lines: list[str]) -> PlanCheck | str:
        """``plan`` against what the ready server reports allocating in ``log_lines`` (its output since
        its start), or why it cannot be checked."""
        ...


def child_environment(placement: Placement, *layers: Mapping[str, str]) -> dict[str, str]:
    """The daemon's environment less what belongs to the daemon alone, then the variables that show the
    child exactly the GPUs of ``placement`` in its order, then ``layers`` applied in order (a model's own
    `env:` last, so the user has the last word)."""
    env = {k: v for k, v in os.environ.items() if k not in _DAEMON_ONLY_ENV}
    env.update(visibility_env(placement.devices))
    for layer in layers:
        env.update(layer)
    return env


def check_model_file(model: ModelSettings, name: str) -> None:
    """The model file must be a regular file (a FIFO or a device would block or never end its reading); a
    hub model's must be in the Hugging Face cache (a start downloads it first, as `launcher pull` does)."""
    path = local_model_file(model)
    if isinstance(model.mmproj, HubRef) and local_projector(model) is None:
        raise ModelFileError(
            f"{name}: the projector {model.mmproj} is not downloaded", hint=f"`launcher pull {name}` downloads it"
        )
    if isinstance(model.model, HubRef) and path is None:
        raise ModelFileError(
            f"{name}: the hub model {model.model} is not downloaded", hint=f"`launcher pull {name}` downloads it"
        )
    problem = "does not exist" if path is None else regular_problem(path)
    if problem is not None:
        raise ModelFileError(
            f"model file {path} for {name!r} {problem}", hint=f"check models.{name}.model in the configuration"
        )


def hub_files_cached(model: ModelSettings) -> bool:
    """A hub model's files, and its projector's if it is a hub one, are all in the cache."""
    projector_there = not isinstance(model.mmproj, HubRef) or local_projector(model) is not None
    return local_model_file(model) is not None and projector_there


def local_projector(model: ModelSettings) -> Path | None:
    """The `mmproj:` file on this disk: its path, or a hub one's in the cache (None when not there)."""
    if isinstance(model.mmproj, HubRef):
        from launcher.hub.cache import cached_file

        return cached_file(model.mmproj, None)
    return model.mmproj


def with_local_projector(model: ModelSettings) -> ModelSettings:
    """``model`` with a hub projector that is in the cache named by its file there, for the planner (which
    reads no cache); ``model`` itself otherwise."""
    if not isinstance(model.mmproj, HubRef):
        return model
    found = local_projector(model)
    return model if found is None else model.model_copy(update={"mmproj": found})


def local_model_file(model: ModelSettings) -> Path | None:
    """The model's file on this disk: its path, or a hub model's (first) file in the Hugging Face cache
    (None when not there whole). Reads the disk."""
    if isinstance(model.model, HubRef):
        from launcher.hub.cache import cached_model

        return cached_model(model.model, model.revision)
    return model.model


def configured_binary(path: Path, what: str) -> Path:
    """A binary the configuration names: it must exist and be executable."""
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise ConfigError(f"{what} binary {path} does not exist or is not executable")
    return path


def planned_file(backend: ServerBackend, model: ModelSettings, name: str) -> Path | None:
    """The model file the planner reads, once ``backend`` has checked that the model can be there
    (ConfigError, ModelFileError when not). None: there is no file to read (an rpc-server, or an Ollama
    model planned by its `ollama.size_mib`). It reads the disk: call it off the event loop."""
    backend.check_model(model, name)
    return backend.model_file(model)


@runtime_checkable
class SizedRemotely(Protocol):
    """A backend whose model, not yet at hand, can be sized from where it will be pulled (Ollama's registry)."""

    def remote_shape(self, model: ModelSettings) -> ModelShape | None:
        """The model's shape from afar when it is not at hand; None when it is (or is sized otherwise)."""
        ...


def planned_model(backend: ServerBackend, model: ModelSettings, name: str) -> Path | ModelShape | None:
    """`planned_file`, or for a model still to be pulled by its backend its shape from afar (network: call it
    in a planning thread)."""
    found = planned_file(backend, model, name)
    if found is None and isinstance(backend, SizedRemotely):
        return backend.remote_shape(model)
    return found


def with_command(plan: Plan, spec: LaunchSpec) -> Plan:
    """The plan with the exact command line and the environment the launcher sets (what differs from its own)."""
    env = {k: v for k, v in spec.env.items() if os.environ.get(k) != v}
    return plan.model_copy(update={"command": spec.argv, "env": env})
