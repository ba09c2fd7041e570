"""What a read-only command does when no daemon answers: read the GPUs here, and plan against them.

Nothing here takes the state directory, stops, starts or records a process: a planner built from the
settings and one GPU reading is all `launcher plan` needs, and the GPU backend is opened and closed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from launcher import replicas
from launcher.backends import backend_for, planned_file, with_command
from launcher.config import Settings
from launcher.gpu import open_backend
from launcher.gpu.base import GpuBackend
from launcher.gpu.sampler import read_sample
from launcher.plan.planner import Planner
from launcher.schema import GpuSample, Plan
from launcher.supervise.ports import pick_free_port


@dataclass(frozen=True)
class LocalGpus:
    backend: GpuBackend
    description: str  # which GPU backend and why

    def read(self) -> list[GpuSample]:
        return [read_sample(self.backend, gpu, processes=False) for gpu in self.backend.identities()]


@contextmanager
def local_gpus(settings: Settings) -> Iterator[LocalGpus]:
    """The GPU backend the configuration asks for, open for as long as the caller reads (NVML's init
    can take seconds, so a `--watch` keeps it)."""
    backend, description = open_backend(settings.gpus)
    try:
        yield LocalGpus(backend, description)
    finally:
        backend.close()


def plan_here(settings: Settings, name: str) -> Plan:
    """The plan of ``name`` against the GPUs as read now, with no other instance's claims."""
    with local_gpus(settings) as gpus:
        samples = gpus.read()
        identities, links = gpus.backend.identities(), gpus.backend.links()
    model = replicas.lookup(replicas.expand(settings, [g.index for g in identities]), settings, name)
    backend = backend_for(model, settings.rpc)
    planner = Planner(settings.gpus, identities, links)
    plan = planner.plan(name, model, planned_file(backend, model, name), samples, {})
    # The port a start would take: the configured one, or the first free one (a test bind, nothing held).
    port = (
        model.port
        if isinstance(model.port, int)
        else pick_free_port(*settings.daemon.instance_ports, [settings.daemon.port])
    )
    return with_command(plan, backend.launch_spec(model, port, planner.placement(plan)))
