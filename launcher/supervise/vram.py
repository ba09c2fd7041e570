"""GPU memory coming back: the memory a server held is free again only a moment after it ended (the driver
releases a killed process's memory late), and a start before it is back runs out of it. The gate keeps
what each ended server held and when, and makes a start wait for it (bounded by `gpus.vram_wait_s`).

Only a reading taken after the last server on a GPU ended counts: an older one still shows the memory as
it was, or (read before that server took it) as free when it is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

from launcher.config_gpus import GpuSettings
from launcher.schema_gpus import GpuSample
from launcher.schema_instances import Event


class Readings(Protocol):
    """What the gate reads of the GPU sampler (launcher/gpu/sampler.py)."""

    def latest(self) -> Sequence[GpuSample]: ...

    async def read_now(self, indices: Iterable[int]) -> None: ...


class VramGate:
    def __init__(
        self,
        gpus: GpuSettings,
        readings: Readings,
        publish: Callable[[Event], None],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``publish``: where the waits are told; ``clock``: seconds since the epoch, the clock of the
        samples' `time`."""
        self._gpus = gpus
        self._readings = readings
        self._publish = publish
        self._clock = clock
        self._sampled = asyncio.Event()  # set at every GPU sample: what a wait awaits
        self._vacated: dict[int, tuple[int, float]] = {}  # GPU -> (MiB a stopped server held, until: monotonic)
        self._released_at: dict[int, float] = {}  # GPU -> when a server on it last ended (epoch seconds)

    def reconfigure(self, gpus: GpuSettings) -> None:
        """Use ``gpus`` (margins, reserve, overhead, waits) from now on: a reload."""
        self._gpus = gpus

    def sampled(self) -> None:
        """A new GPU sample arrived: a wait looks again."""
        self._sampled.set()

    def vacated(self, claims_mib: Mapping[int, int]) -> None:
        """Note the memory a server held as it ended: the next start there waits for it."""
        until, now = time.monotonic() + self._gpus.vram_wait_s, self._clock()
        for index, mib in claims_mib.items():
            self._vacated[index] = (mib, until)
            self._released_at[index] = now

    async def await_vacated(self, who: str) -> None:
        """Before a placement: wait for the memory the servers that ended lately gave back (a plan made
        without it would not see it), then forget it, unless a server ended there again meanwhile."""
        now = time.monotonic()
        recent = {i: entry for i, entry in self._vacated.items() if entry[1] > now}
        if not recent:
            return
        await self.await_vram({i: mib for i, (mib, _until) in recent.items()}, who)
        for index, entry in recent.items():
            if self._vacated.get(index) == entry:
                del self._vacated[index]

    async def await_vram(self, claims_mib: Mapping[int, int], who: str) -> None:
        """Return once each GPU in ``claims_mib`` has that many MiB free, with the margin and its reserve,
        in a reading taken after the last server there ended; or after `gpus.vram_wait_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._gpus.vram_wait_s
        # What the plan needs there: its claim, with the margin and the GPU's reserve kept free.
        needed = {i: mib + self._gpus.margin_mib + self._gpus.reserve_mib.get(i, 0) for i, mib in claims_mib.items()}
        told = False
        while True:
            free = {
                s.index: s.memory_free_mib
                for s in self._readings.latest()
                if s.time > self._released_at.get(s.index, 0.0)
            }
            short = {i: mib for i, mib in needed.items() if (free.get(i) or 0) < mib}
            if not short:
                return
            if not told:
                what = ", ".join(
                    f"GPU {i} ({free[i]} of {mib} MiB free)" if i in free else f"GPU {i} (no reading since)"
                    for i, mib in short.items()
                )
                self._publish(Event.now("vram", f"{who}: waiting for memory to come back on {what}"))
                told = True
            remaining = deadline - loop.time()
            if remaining <= 0:
                self._publish(Event.now("vram", f"{who}: memory not back after {self._gpus.vram_wait_s:g}s"))
                return
            unread = [i for i in claims_mib if i not in free]  # no reading since the release: take one now
            self._sampled.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._readings.read_now(unread) if unread else self._sampled.wait(), remaining)
