"""The sampler: errors are data and are retried, a vanished GPU is marked, a slow GPU stalls only itself,
and the API answers while a backend call hangs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from launcher.api.app import create_app
from launcher.config import SimGpu, parse_settings
from launcher.gpu.sampler import Sampler
from launcher.gpu.sim import SimBackend
from launcher.schema import GpuSample
from tests.conftest import OpenManager

POLL_S = 0.05


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
    sim.inject(0, delay_s=1.0)
    await next_sample(sampler, 1)
    await next_sample(sampler, 1)  # GPU 1 goes on being read meanwhile
    await asyncio.sleep(4 * POLL_S)
    stale = sampler.latest()[0]
    assert stale.error is not None and "the driver is not answering" in stale.error
    sim.inject(0)


async def test_history_is_bounded(sim_sampler: tuple[SimBackend, Sampler]) -> None:
    _sim, sampler = sim_sampler
    for _ in range(25):
        await next_sample(sampler, 0)
    history = sampler.history(0)
    assert len(history) == 20
    assert [s.time for s in history] == sorted(s.time for s in history)


async def test_api_latency_is_unaffected_by_a_slow_backend(tmp_path: Path, open_manager: OpenManager) -> None:
    gpus = f"gpus: {{backend: sim, poll_interval: {POLL_S}, sim: [{{name: A, memory_mib: 1000}}]}}"
    settings = parse_settings(f"daemon: {{state_dir: {tmp_path / 'state'}}}\n{gpus}", tmp_path / "l.yaml")
    manager = await open_manager(settings)
    sim = manager.sampler.backend
    assert isinstance(sim, SimBackend)
    app = create_app(manager, settings)
    sim.inject(0, delay_s=2.0)  # every read from now on takes 2 s, in the sampler's thread
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            await asyncio.sleep(2 * POLL_S)  # a slow read is under way
            began = time.perf_counter()
            response = await client.get("/gpus")
            elapsed = time.perf_counter() - began
        assert response.status_code == 200
        assert response.json()[0]["memory_total_mib"] == 1000
        assert elapsed < 0.5, f"/gpus took {elapsed:.3f}s while a GPU read hung"
    finally:
        sim.inject(0)
