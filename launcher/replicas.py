"""The instances of a configuration: each configured model, or its replicas (`replicas: per-gpu` or N),
each replica on a GPU of its own and, from a fixed `port`, on consecutive ports. Pure: the GPUs seen are
passed in."""

from __future__ import annotations

from collections.abc import Sequence

from launcher.config import Settings
from launcher.config_model import ModelSettings
from launcher.errors import ConfigError, NotFoundError

# A replica's instance is its model's name, this, and its index: `@` is in no model's name (config.py).
REPLICA_SEPARATOR = "@"


def model_of(instance: str) -> str:
    """The configured model an instance's name belongs to (a replica's model, or the instance itself)."""
    return instance.partition(REPLICA_SEPARATOR)[0]


def expand(settings: Settings, gpu_indices: Sequence[int]) -> dict[str, tuple[str, ModelSettings]]:
    """Instance name -> (the configured model's name, the instance's settings), in configuration order."""
    result: dict[str, tuple[str, ModelSettings]] = {}
    for group, model in settings.models.items():
        for name, replica in _replicas(group, model, gpu_indices):
            result[name] = (group, replica)
    return result


def _replicas(group: str, model: ModelSettings, seen: Sequence[int]) -> list[tuple[str, ModelSettings]]:
    if model.replicas == 1:
        return [(group, model)]
    gpus = list(model.gpus) if isinstance(model.gpus, list) else list(seen)
    count = len(gpus) if model.replicas == "per-gpu" else model.replicas
    if not gpus or count > len(gpus):
        raise ConfigError(
            f"models.{group}.replicas asks for {count or 'one per GPU'} but {len(gpus)} GPUs are there",
            hint="each replica runs on a GPU of its own",
        )
    return [
        (
            f"{group}{REPLICA_SEPARATOR}{i}",
            model.model_copy(
                update={
                    "gpus": [gpus[i]],
                    "replicas": 1,
                    "port": model.port + i if isinstance(model.port, int) else "auto",
                }
            ),
        )
        for i in range(count)
    ]


def lookup(instances: dict[str, tuple[str, ModelSettings]], settings: Settings, name: str) -> ModelSettings:
    """The settings of instance ``name``; NotFoundError naming the replicas or the configured models."""
    if name in instances:
        return instances[name][1]
    members = [n for n, (group, _m) in instances.items() if group == name]
    if members:
        raise NotFoundError(f"{name} runs as replicas: act on them", hint=f"replicas: {', '.join(members)}")
    settings.model(name)  # raises NotFoundError naming the configured models
    raise NotFoundError(f"no instance named {name!r}")
