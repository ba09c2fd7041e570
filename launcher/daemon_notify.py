"""What the daemon tells systemd while it serves (launcher/systemd.py speaks the protocol): its STATUS= line
kept current, the watchdog fed while the event loop and the GPU sampler live, and READY=1 once every
autostart instance got somewhere (daemon.ready_when: loaded)."""

from __future__ import annotations

import asyncio
import time

from launcher.schema_instances import State
from launcher.systemd import Notifier, sampler_problem, status_line
from launcher.wiring import Wired

# daemon.ready_when: loaded sends READY=1 once every autostart instance got here.
_SETTLED = frozenset({State.READY, State.FAILED, State.STOPPED})


def notify(notifier: Notifier, wired: Wired) -> asyncio.Task[None]:
    """Keep systemd's STATUS= line current and its watchdog fed while the loop and the sampler live."""
    manager, sampler = wired.manager, wired.sampler
    sampler.subscribe(lambda _sample: notifier.changed())

    def problem() -> str | None:  # a second's grace for a read under way (a reload may change stale_after_s)
        stale_after_s = sampler.stale_after_s + 1.0
        return sampler_problem([s.time for s in sampler.latest()], time.time(), stale_after_s)

    def status() -> str:
        return status_line(manager.statuses(), manager.gpu_samples())

    return asyncio.create_task(notifier.run(status, problem), name="systemd-notify")


async def ready_when_loaded(notifier: Notifier, wired: Wired) -> None:
    """READY=1 once every autostart instance is ready, or gave up (failed), or was removed by a reload: one
    bad model must not keep the daemon from starting, and `systemctl status` shows it in the status line."""
    events, instances = wired.events.subscribe(), wired.table.view
    try:
        names = wired.manager.autostart_names()
        while not all(instances[name].state in _SETTLED for name in names if name in instances):
            await events.get()
    finally:
        wired.events.unsubscribe(events)
    notifier.ready()
