"""The sampler: errors are data and are retried, a vanished GPU is marked, a slow GPU stalls only itself,
and the API answers while a backend call hangs."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from launcher.api.app import create_app
from launcher.config_file import parse_settings
from launcher.config_gpus import SimGpu
from launcher.gpu.sampler import Sampler
from launcher.gpu.sim import Hold, SimBackend
from launcher.schema_gpus import GpuSample
from tests.conftest import OpenWired

POLL_S = 0.05
SIM_A = {"name": "A", "memory_mib": 1000}


@pytest.fixture
async def sim_sampler() -> AsyncIterator[tuple[SimBackend, Sampler]]:
    sim = SimBackend([SimGpu(name="A", memory_mib=24576), SimGpu(name="B", memory_mib=16384)])
    sampler = Sampler(sim, poll_interval_s=POLL_S, history=20, process_every=2)
    await sampler.start()
    yield sim, sampler
    await sampler.stop()


async def next_sample(sampler: Sampler, index: int) -> GpuSample:
    """The next sample of GPU ``index`` (event-driven: the sampler's listener resolves it)."""
    future: asyncio.Future[GpuSample] = asyncio.get_running_loop().create_future()

    def listener(sample: GpuSample) -> None:
        if sample.index == index and not future.done():
            future.set_result(sample)

    sampler.subscribe(listener)
    return await asyncio.wait_for(future, 5)


async def test_first_reading_is_there_at_start(sim_sampler: tuple[SimBackend, Sampler]) -> None:
    _sim, sampler = sim_sampler
    latest = sampler.latest()
    assert [(s.index, s.memory_total_mib, s.error) for s in latest] == [(0, 24576, None), (1, 16384, None)]


async def test_an_erroring_gpu_is_marked_retried_and_recovers(sim_sampler: tuple[SimBackend, Sampler]) -> None:
    sim, sampler = sim_sampler
    sim.inject(0, error="NVML: Unknown Error")
    failing = [await next_sample(sampler, 0) for _ in range(3)]  # keeps being read
    assert all(s.error == "GpuError: NVML: Unknown Error" and s.memory_used_mib is None for s in failing)
    assert sampler.latest()[1].error is None  # the other GPU is unaffected
    sim.inject(0)
    recovered = await next_sample(sampler, 0)
    assert recovered.error is None and recovered.memory_total_mib == 24576


async def test_a_vanished_gpu_keeps_its_identity_and_says_so(sim_sampler: tuple[SimBackend, Sampler]) -> None:
    sim, sampler = sim_sampler
    sim.inject(1, error="GPU is lost")
    lost = await next_sample(sampler, 1)
    assert (lost.index, lost.name, lost.error) == (1, "B", "GpuError: GPU is lost")
    assert sampler.history(1)[-1] == lost


async def test_a_hung_gpu_stalls_only_itself(sim_sampler: tuple[SimBackend, Sampler]) -> None:
    sim, sampler = sim_sampler
    hold = Hold()
    sim.inject(0, hold=hold)
    await hold.entered()  # a read of GPU 0 is under way and will not return until released
    last = sampler.history(0)[-1]  # GPU 0's last reading before it hung
    # GPU 1 goes on being read meanwhile: wait for its readings until GPU 0's is older than the stale limit.
    async with asyncio.timeout(5):
        other = await next_sample(sampler, 1)
        while other.time - last.time <= sampler.stale_after_s:
            other = await next_sample(sampler, 1)
    assert other.error is None
    stale = sampler.latest()[0]
    assert stale.model_copy(update={"error": None}) == last  # still the reading from before the hang
    assert stale.error is not None and re.fullmatch(r"no reading for \d+s: the driver is not answering", stale.error)
    sim.inject(0)  # healed: the hung read returns and GPU 0 is read again
    recovered = await next_sample(sampler, 0)
    assert recovered.error is None and recovered.time > last.time
    assert sampler.latest()[0].error is None


async def test_history_is_bounded(sim_sampler: tuple[SimBackend, Sampler]) -> None:
    _sim, sampler = sim_sampler
    for _ in range(25):
        await next_sample(sampler, 0)
    history = sampler.history(0)
    assert len(history) == 20
    assert [s.time for s in history] == sorted(s.time for s in history)


async def test_api_latency_is_unaffected_by_a_hung_backend(tmp_path: Path, open_wired: OpenWired) -> None:
    config = {"daemon": {"state_dir": str(tmp_path / "state")}, "gpus": {"backend": "sim", "sim": [SIM_A]}}
    settings = parse_settings(json.dumps(config), tmp_path / "l.yaml")
    wired = await open_wired(settings)
    sim = wired.sampler.backend
    assert isinstance(sim, SimBackend)
    app = create_app(settings, wired)
    hold = Hold()
    sim.inject(0, hold=hold)
    try:
        await hold.entered()  # a read of GPU 0 is under way and will not return until released
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            began = time.perf_counter()
            response = await asyncio.wait_for(client.get("/gpus"), 5)  # answered while the read still hangs
            elapsed = time.perf_counter() - began
        assert response.status_code == 200
        assert response.json()[0]["memory_total_mib"] == 1000
        assert elapsed < 0.5, f"/gpus took {elapsed:.3f}s while a GPU read hung"
    finally:
        sim.inject(0)
