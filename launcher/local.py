"""What a read-only command does when no daemon answers: read the GPUs here, and plan against them.

Nothing here takes the state directory, stops, starts or records a process: a planner built from the
settings and one GPU reading is all `launcher plan` needs, and the GPU backend is opened and closed.
`launcher pull` downloads a hub model's files into the Hugging Face cache here, as a start would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from launcher import replicas
from launcher.backends import backend_for, planned_model, with_command
from launcher.backends.base import hub_files_cached, with_local_projector
from launcher.config import Settings
from launcher.config_model import ModelSettings
from launcher.errors import ConfigError
from launcher.gpu import open_backend
from launcher.gpu.base import GpuBackend
from launcher.gpu.sampler import read_sample
from launcher.hub_ref import HubRef
from launcher.plan.planner import NOT_MEASURED, Measured, Planner
from launcher.schema_gpus import GpuSample
from launcher.schema_instances import Download
from launcher.schema_plans import Plan
from launcher.statedir.layout import StateDir
from launcher.statedir.measurements import MeasurementStore
from launcher.supervise.measuring import Measuring
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


def plan_here(settings: Settings, name: str, estimate: bool = False) -> Plan:
    """The plan of ``name`` against the GPUs as read now, with no other instance's claims; with what
    earlier runs measured (kept in the state directory) unless ``estimate``."""
    with local_gpus(settings) as gpus:
        samples = gpus.read()
        identities, links = gpus.backend.identities(), gpus.backend.links()
    model = replicas.lookup(replicas.expand(settings, [g.index for g in identities]), settings, name)
    backend = backend_for(model, settings.rpc)
    planner = Planner(settings.gpus, identities, links)
    if isinstance(model.model, HubRef) and not hub_files_cached(model):
        # planned from its headers (offline: said so); its command comes with its download
        return _plan_from_hub(settings, planner, name, model, samples)
    found = planned_model(backend, model, name)  # an Ollama model to pull: its size from the registry
    measured = NOT_MEASURED
    if not estimate and isinstance(found, Path):
        measuring = Measuring(_measurements(settings), identities)
        measured = Measured(measuring.lookup(model, found, backend.binary(model)), measuring.overheads_mib())
    plan = planner.plan(name, with_local_projector(model), found, samples, {}, measured=measured)
    # The port a start would take: the configured one, or the first free one (a test bind, nothing held).
    port = (
        model.port
        if isinstance(model.port, int)
        else pick_free_port(*settings.daemon.instance_ports, [settings.daemon.port])
    )
    return with_command(plan, backend.launch_spec(model, port, planner.placement(plan)))


def _plan_from_hub(
    settings: Settings, planner: Planner, name: str, model: ModelSettings, samples: list[GpuSample]
) -> Plan:
    """A hub model's plan from its files' headers (the hub's library is imported only here)."""
    from launcher.hub.headers import hub_reader
    from launcher.hub.planning import plan_from_hub

    reader = hub_reader(settings.hub, StateDir(settings.daemon.state_dir).hub_headers_dir)
    return plan_from_hub(planner, reader, name, model, samples, {})


def pull_here(settings: Settings, name: str, on_progress: Callable[[Download], None]) -> tuple[Plan, list[Path]]:
    """Download the files of hub model ``name`` into the Hugging Face cache (the quant its plan against the
    GPUs read now chooses), in this process; its plan and the files' paths. Nothing fetched when there."""
    from launcher.hub.cache import cache_dir
    from launcher.hub.fetching import pull_planned

    model = replicas.lookup(replicas.expand(settings, []), settings, name)
    if model.backend == "ollama":
        raise ConfigError(
            f"{name} is an Ollama model: Ollama pulls it through its own server, which the daemon runs",
            hint=f"`launcher up {name}` pulls it through the daemon's Ollama (or run `ollama pull {model.model}`)",
        )
    if not isinstance(model.model, HubRef):
        raise ConfigError(f"{name} is not a hub model (model: hf:...): there is nothing to pull")
    plan = plan_here(settings, name)
    cached = backend_for(model, settings.rpc).model_file(model)
    if plan.hub is None and cached is not None:  # in the cache already, with its projector
        return plan, [cached]
    assert plan.hub is not None  # a hub model not in the cache is planned from its headers
    state = StateDir(settings.daemon.state_dir)
    return plan, pull_planned(plan.hub, model, settings.hub, state.hub_headers_dir, cache_dir(), on_progress)


def _measurements(settings: Settings) -> MeasurementStore:
    return MeasurementStore(StateDir(settings.daemon.state_dir).measured_file)


def forget_measurements(settings: Settings, name: str) -> int:
    """Forget what the runs of configured model ``name`` measured (a running daemon reads the file at each
    plan, so its next plan of ``name`` is estimated); how many measurements there were."""
    if name not in settings.models:
        raise ConfigError(f"no model named {name!r} in the configuration", hint="`launcher status` lists them")
    try:
        return _measurements(settings).forget(name)
    except OSError as exc:
        raise ConfigError(
            f"cannot change {_measurements(settings).path}: {exc.strerror or exc}",
            hint="run it as the user the daemon runs as",
        ) from None
