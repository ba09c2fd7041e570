"""The launcher's own plan and command line for a model split over N simulated GPUs, as a real run needs them.

The simulated GPUs are sized (bench.accuracy.plan_for) so that the planner has to use all N of them,
unevenly, with nothing held back (no margin, no overhead); the plan is then made by the launcher's
`Planner` from the model's settings and launched with the argv and environment `LlamaServerBackend` builds:
exactly what the daemon would run, the caller adding only `--rpc` for the devices.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.accuracy import plan_for
from bench.realbuffers import free_port
from launcher.backends.llama_server import LlamaServerBackend
from launcher.config_gpus import GpuSettings, SimGpu
from launcher.config_model import ModelSettings
from launcher.gpu.sampler import read_sample
from launcher.gpu.sim import SimBackend
from launcher.plan.estimate import ModelShape
from launcher.plan.gguf import read_gguf
from launcher.plan.planner import Placed, Planner, projector_bytes
from launcher.plan.runtime import runtime_for


@dataclass(frozen=True)
class PlannedLaunch:
    placed: Placed
    argv: list[str]
    env: dict[str, str]
    port: int


def planned_launch(model: ModelSettings, devices: int) -> PlannedLaunch:
    """The plan for ``model`` on ``devices`` simulated GPUs that it must all use, and its launch.
    AssertionError when no room sizes make the planner use that many (a split's compute buffers
    outweigh the model)."""
    assert isinstance(model.model, Path)  # a llama-server entry of a local file
    shape = ModelShape.of(read_gguf(model.model))
    devices_planned = plan_for(
        shape, runtime_for(model, shape, projector_bytes=projector_bytes(model)), devices
    ).devices
    gpu_settings = GpuSettings(
        backend="sim",
        margin_mib=0,
        overhead_mib=0,
        sim=[SimGpu(name=f"sim{r.gpu}", memory_mib=r.usable_mib) for r in devices_planned],
    )
    gpus = SimBackend(gpu_settings.sim)
    samples = [read_sample(gpus, gpu, processes=False) for gpu in gpus.identities()]
    placed = Planner(gpu_settings, gpus.identities(), gpus.links()).place("m", model, model.model, samples, {})
    port = free_port()
    spec = LlamaServerBackend(model).launch_spec(model, port, placed.placement)
    return PlannedLaunch(placed, spec.argv, spec.env, port)
