"""The VRAM gate (launcher/supervise/vram.py) against a stand-in for the GPU sampler: exact, no waiting on
time but for the bound of a wait that is never met."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from launcher.config_gpus import GpuSettings
from launcher.schema_gpus import GpuSample
from launcher.schema_instances import Event
from launcher.supervise.vram import VramGate
from tests.conftest import gpu_sample

_ENDED_AT = 100.0  # the gate's clock (epoch seconds) when a server ends in these tests


class Readings:
    """The sampler's latest readings, set by the test; `read_now` takes the reading queued for a GPU.
    `looked` is set at each look at the latest readings."""

    def __init__(self, *samples: GpuSample) -> None:
        self.samples = {s.index: s for s in samples}
        self.queued: dict[int, GpuSample] = {}
        self.reads: list[list[int]] = []
        self.looked = asyncio.Event()

    def latest(self) -> list[GpuSample]:
        self.looked.set()
        return list(self.samples.values())

    async def read_now(self, indices: Iterable[int]) -> None:
        asked = list(indices)
        self.reads.append(asked)
        for index in asked:
            self.samples[index] = self.queued.pop(index)


class Told:
    """The gate's events; `waiting` is set once it says it waits."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.waiting = asyncio.Event()

    def __call__(self, event: Event) -> None:
        assert event.kind == "vram"
        self.messages.append(event.message)
        if "waiting" in event.message:
            self.waiting.set()


def _gate(readings: Readings, told: Told, vram_wait_s: float = 30.0) -> VramGate:
    gpus = GpuSettings(margin_mib=10, reserve_mib={0: 5}, vram_wait_s=vram_wait_s)
    return VramGate(gpus, readings, told, clock=lambda: _ENDED_AT)


async def test_memory_that_is_free_with_the_margin_and_reserve_lets_a_start_through_at_once() -> None:
    readings, told = Readings(gpu_sample(0, 115, time=1.0)), Told()
    await _gate(readings, told).await_vram({0: 100}, "a")
    assert told.messages == [] and readings.reads == []


async def test_a_wait_that_is_not_met_ends_at_its_bound_and_says_so() -> None:
    readings, told = Readings(gpu_sample(0, 114, time=1.0)), Told()  # one MiB short of 100 + 10 + 5
    await _gate(readings, told, vram_wait_s=0).await_vram({0: 100}, "a")
    assert told.messages == [
        "a: waiting for memory to come back on GPU 0 (114 of 115 MiB free)",
        "a: memory not back after 0s",
    ]


async def test_after_a_server_ended_only_a_reading_taken_since_counts() -> None:
    # Read before the server ended: it shows the memory free that the server was still holding.
    readings, told = Readings(gpu_sample(0, 900, time=_ENDED_AT - 1)), Told()
    readings.queued[0] = gpu_sample(0, 600, time=_ENDED_AT + 1)
    gate = _gate(readings, told)
    gate.vacated({0: 500})
    await gate.await_vram({0: 500}, "b")
    assert readings.reads == [[0]]  # no reading since: one taken at once, not awaited
    assert told.messages == ["b: waiting for memory to come back on GPU 0 (no reading since)"]


async def test_a_wait_looks_again_at_each_gpu_sample() -> None:
    readings, told = Readings(gpu_sample(0, 100, time=1.0)), Told()
    gate = _gate(readings, told)
    waiting = asyncio.create_task(gate.await_vram({0: 500}, "c"))
    await asyncio.wait_for(told.waiting.wait(), 5)
    readings.looked.clear()
    gate.sampled()  # a sample that still shows too little: it looks, and waits on
    await asyncio.wait_for(readings.looked.wait(), 5)
    assert not waiting.done()
    readings.samples[0] = gpu_sample(0, 515, time=2.0)
    gate.sampled()
    await asyncio.wait_for(waiting, 5)
    assert told.messages == ["c: waiting for memory to come back on GPU 0 (100 of 515 MiB free)"]
    assert readings.reads == []  # a reading was there: the next sample was awaited, none forced


async def test_a_placement_waits_for_what_ended_servers_held_once() -> None:
    readings, told = Readings(gpu_sample(0, 1000, time=_ENDED_AT - 1)), Told()
    readings.queued[0] = gpu_sample(0, 415, time=_ENDED_AT + 1)
    gate = _gate(readings, told)
    await gate.await_vacated("d")  # nothing ended: nothing to wait for
    assert readings.reads == [] and told.messages == []
    gate.vacated({0: 400})
    await gate.await_vacated("d")
    assert readings.reads == [[0]]
    assert told.messages == ["d: waiting for memory to come back on GPU 0 (no reading since)"]
    await gate.await_vacated("e")  # waited for once: forgotten
    assert readings.reads == [[0]] and len(told.messages) == 1
