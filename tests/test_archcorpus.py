"""The architecture corpus against the planner: every header is planned (fast), and two families that are
not llama-shaped, split over two real llama.cpp devices (one ggml-rpc-server each), hold per device what
their plan says (issue 10's targets: KV within 2 %, total within 3 % or 32 MiB). bench/accuracy_arch.py
runs the whole grid."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.config_gpus import GpuSettings, SimGpu
from launcher.config_model import ModelSettings
from launcher.gpu.sampler import read_sample
from launcher.gpu.sim import SimBackend
from launcher.plan.planner import Planner
from tests import archcorpus
from tests.conftest import MARK
from tests.test_plan_real import check_devices

MODELS = [n for n in archcorpus.NAMES if n != "mmproj"]  # the projector is a model's companion, not a model
# Families with no KV cache at all, only a recurrent state.
RECURRENT = {"mamba", "mamba2", "rwkv7"}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("scale", [1, 64])  # as the corpus runs, and the size of a large real model
def test_every_architecture_is_planned(name: str, scale: int, tmp_path: Path) -> None:
    path = archcorpus.write(archcorpus.entry(name, scale), tmp_path / f"{name}.gguf")
    gpus = GpuSettings(backend="sim", sim=[SimGpu(name="big", memory_mib=1 << 22)])
    sim = SimBackend(gpus.sim)
    samples = [read_sample(sim, g, processes=False) for g in sim.identities()]
    plan = Planner(gpus, sim.identities(), sim.links()).plan(
        name, ModelSettings(model=path, ctx=32768), path, samples, {}
    )
    assert plan.fits
    (device,) = plan.devices
    assert device.weights_mib > 0
    if name in RECURRENT:  # no KV cache: a state per layer and slot, not a cache that grows with the context
        assert device.kv_cache_mib == 0 < device.recurrent_mib < device.weights_mib
    else:
        assert device.kv_cache_mib > 0


@pytest.mark.parametrize(
    ("name", "ctx", "args"),
    [("gemma3", 32768, ["-np", "1"]), ("jamba", 8192, []), ("mamba2", 2048, [])],  # mamba2: Mamba-2 handoffs
)
def test_split_over_two_devices_holds_what_was_planned(
    name: str, ctx: int, args: list[str], tmp_path: Path, leaves_no_process: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MARK, leaves_no_process)  # the rpc servers and llama-server are checked for leftovers
    # Wide enough that the weights, not the compute buffers, make the planner split it.
    path = archcorpus.write(archcorpus.entry(name, 8), tmp_path / f"{name}.gguf")
    model = ModelSettings(model=path, ctx=ctx, args=["-fa", "on", "-lv", "4", *args])
    check_devices(2, model, total_rel=0.03, total_abs_mib=32)
