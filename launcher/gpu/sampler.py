"""The sampler: every GPU read at `poll_interval` in its own worker thread, never on the event loop.

Readings are kept as immutable snapshots with a bounded history per GPU. A GPU whose read fails is
recorded with the error and read again next time; one whose read hangs only stalls itself, and its last
sample is marked stale, so the API and the other GPUs carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from launcher.config import Settings
from launcher.gpu import open_backend
from launcher.gpu.base import GpuBackend
from launcher.gpu.types import GpuIdentity, Link, sample_of
from launcher.schema_gpus import GpuProcess, GpuSample

Listener = Callable[[GpuSample], None]
_STALE_AFTER_POLLS = 3
# ... and never sooner than this: a daemon busy spawning servers can hold its event loop for a few hundred
# ms, and readings late by that are not a hung driver (with a 0.1 s poll every GPU looked unusable then).
_STALE_FLOOR_S = 2.0
# The daemon starts with one reading of every GPU, but a driver that hangs must not hold its start (or its
# SIGTERM) hostage: past this the GPU shows "not read yet" and its reading arrives when it arrives.
_FIRST_READING_TIMEOUT_S = 5.0


class Sampler:
    def __init__(
        self, backend: GpuBackend, *, poll_interval_s: float, history: int = 600, process_every: int = 5
    ) -> None:
        self.backend = backend
        self.identities: list[GpuIdentity] = backend.identities()
        self.links: dict[tuple[int, int], Link] = backend.links()
        self._interval = poll_interval_s
        self._process_every = process_every
        self._history = {g.index: deque[GpuSample](maxlen=history) for g in self.identities}
        self._listeners: list[Listener] = []
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.identities)), thread_name_prefix="gpu")
        self._tasks: list[asyncio.Task[None]] = []
        # At most one read per GPU at a time: a hung driver call blocks one worker, not the pool, and the
        # samples of a GPU arrive in the order they were taken.
        self._reading: dict[int, asyncio.Future[None]] = {}

    def reconfigure(self, *, poll_interval_s: float, history: int, process_every: int) -> None:
        """Read at ``poll_interval_s`` from the next reading on (a reload), keeping the last ``history``
        readings of each GPU."""
        self._interval, self._process_every = poll_interval_s, process_every
        self._history = {index: deque(kept, maxlen=history) for index, kept in self._history.items()}

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener`` with every new sample, on the event loop."""
        self._listeners.append(listener)

    async def start(self, first_reading_timeout_s: float = _FIRST_READING_TIMEOUT_S) -> None:
        """Take one reading of every GPU now (waiting at most ``first_reading_timeout_s``), then keep reading
        in the background."""
        first = [self._poll(g, 0) for g in self.identities]
        if first:
            await asyncio.wait(first, timeout=first_reading_timeout_s)
        self._tasks = [asyncio.create_task(self._watch(g), name=f"gpu{g.index}") for g in self.identities]

    async def stop(self) -> None:
        reads = list(self._reading.values())  # a hung one stays in its worker thread; nobody waits for it
        for task in [*self._tasks, *reads]:
            task.cancel()
        for task in [*self._tasks, *reads]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.backend.close()

    async def _watch(self, gpu: GpuIdentity) -> None:
        loop = asyncio.get_running_loop()
        polls, began = 1, loop.time()  # the first poll was start()'s
        while True:
            await asyncio.sleep(max(0.0, self._interval - (loop.time() - began)))
            began = loop.time()
            await self._poll(gpu, polls)
            polls += 1

    def _poll(self, gpu: GpuIdentity, count: int) -> asyncio.Future[None]:
        """The read of ``gpu`` under way, or a new one. Awaiting it never cancels the read itself."""
        under_way = self._reading.get(gpu.index)
        if under_way is None or under_way.done():
            under_way = self._reading[gpu.index] = asyncio.ensure_future(self._read(gpu, count))
        return asyncio.shield(under_way)

    async def _read(self, gpu: GpuIdentity, count: int) -> None:
        read = partial(read_sample, self.backend, gpu, processes=count % self._process_every == 0)
        sample = await asyncio.get_running_loop().run_in_executor(self._pool, read)
        self._history[gpu.index].append(sample)
        for listener in self._listeners:
            listener(sample)

    async def read_now(self, indices: Iterable[int]) -> None:
        """Read these GPUs at once, outside the schedule (one waits on a reading newer than an event);
        the samples go to history and listeners like any other."""
        by_index = {g.index: g for g in self.identities}
        await asyncio.gather(*(self._poll(by_index[i], 1) for i in indices if i in by_index))

    async def processes(self, indices: Iterable[int]) -> dict[int, tuple[GpuProcess, ...] | None]:
        """The processes on these GPUs and the memory each holds, read now (a read with processes, outside
        the schedule; one already under way without them is awaited, then one more made). None for a GPU
        whose library does not say."""
        by_index = {g.index: g for g in self.identities}
        wanted = [by_index[i] for i in indices if i in by_index]
        found: dict[int, tuple[GpuProcess, ...] | None] = {}
        for _ in range(2):
            await asyncio.gather(*(self._poll(gpu, 0) for gpu in wanted if found.get(gpu.index) is None))
            found = {gpu.index: self._history[gpu.index][-1].processes for gpu in wanted}
        return found

    @property
    def poll_interval_s(self) -> float:
        return self._interval

    @property
    def stale_after_s(self) -> float:
        """A reading older than this is stale: the driver is not answering."""
        return max(_STALE_AFTER_POLLS * self._interval, _STALE_FLOOR_S)

    def latest(self) -> list[GpuSample]:
        """The newest sample of every GPU; one not read for a while says so in its error."""
        now = time.time()
        result = []
        for gpu in self.identities:
            history = self._history[gpu.index]
            if not history:
                result.append(sample_of(gpu, None, now, error="not read yet"))
                continue
            sample = history[-1]
            age = now - sample.time
            if age > self.stale_after_s and sample.error is None:
                sample = sample.model_copy(update={"error": f"no reading for {age:.0f}s: the driver is not answering"})
            result.append(sample)
        return result

    def history(self, index: int) -> list[GpuSample]:
        return list(self._history[index])


def read_sample(backend: GpuBackend, gpu: GpuIdentity, *, processes: bool) -> GpuSample:
    """One reading of ``gpu`` as a sample; a failed read is a sample with the error, never an exception.
    Its time is when the read began: what it shows is no newer than that."""
    began = time.time()
    try:
        return sample_of(gpu, backend.read(gpu.index, processes=processes), began)
    except Exception as exc:  # a GPU's failure is data, never the daemon's death
        return sample_of(gpu, None, began, error=f"{type(exc).__name__}: {exc}")


def open_sampler(settings: Settings, sim_usage: Callable[[], Mapping[int, int]]) -> tuple[Sampler, str]:
    """A sampler over the GPU backend the configuration asks for, and which backend and why. ``sim_usage``:
    MiB per GPU that the launcher's servers hold, which simulated GPUs show as used."""
    backend, reason = open_backend(settings.gpus, sim_usage)
    gpus = settings.gpus
    sampler = Sampler(
        backend, poll_interval_s=gpus.poll_interval, history=gpus.history, process_every=gpus.process_every
    )
    return sampler, reason
