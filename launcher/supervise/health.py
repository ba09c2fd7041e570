"""What `/health` tells of the instances, from the system rather than our own records: whether every
autostart instance serves with a live server process, the servers supervision lost, and the warnings."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from launcher.schema_instances import State
from launcher.supervise.instance import Instance

# The states in which an instance's server process must be alive.
_WITH_PROCESS = frozenset({State.LOADING, State.READY, State.UNHEALTHY, State.DRAINING})


def all_ready(instances: Mapping[str, Instance], names: Collection[str]) -> bool:
    """Each of ``names`` is ready, and its server process lives (asked of the system)."""
    return all(instances[name].state == State.READY and instances[name].alive for name in names)


def lost_servers(instances: Mapping[str, Instance]) -> list[str]:
    """The instances whose state says their server runs while no process lives (supervision lost it)."""
    return [name for name, i in instances.items() if i.state in _WITH_PROCESS and not i.alive]


def health_warnings(instances: Mapping[str, Instance], writes_warning: str | None) -> list[str]:
    """What `/health` warns of: a lost server (see `lost_servers`), a state directory that cannot be written
    (``writes_warning``: the servers run on)."""
    lost = [
        f"{name} is {instances[name].state.value} but has no live server process" for name in lost_servers(instances)
    ]
    return lost + ([writes_warning] if writes_warning is not None else [])
