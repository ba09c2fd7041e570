"""`launcher up` with no daemon: the daemon in this process, with only the named models started, until
Ctrl-C or SIGTERM stops it all. It owns the state directory like any daemon, so `launcher status` from
another terminal talks to it, and a second foreground `up` is refused."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from launcher.cli_output import as_json
from launcher.cli_progress import ProgressPrinter, all_ready, ready_report
from launcher.config import Settings
from launcher.daemon import Daemon
from launcher.schema_instances import Event, InstanceStatus
from launcher.supervise.manager import Manager

_POLL_S = 0.1


async def run(settings: Settings, names: list[str], *, as_json_output: bool) -> int:
    printing_events = False

    def on_event(event: Event) -> None:
        # Before ready the progress display speaks; after it, every crash and restart is told.
        if printing_events:
            print(f"{event.time} {event.describe()}", file=sys.stderr, flush=True)

    started: asyncio.Future[Manager] = asyncio.get_running_loop().create_future()
    daemon = Daemon(settings, autostart=False, on_event=on_event, on_started=started.set_result, hangup_stops=True)
    serving = asyncio.ensure_future(daemon.run_until_stopped())
    try:
        if not await _unless_stopped(started, serving):
            return 130
        manager = started.result()
        members = [member for name in names for member in manager.group(name)]
        for name in members:
            await manager.start(name)
        waiting = asyncio.ensure_future(_wait_ready(manager, members, quiet=as_json_output))
        if not await _unless_stopped(waiting, serving):
            print("interrupted; stopped", file=sys.stderr)
            return 130
        statuses = waiting.result()
        report = ready_report(statuses, settings.daemon.client_url, through_daemon=False)
        print(as_json(statuses) if as_json_output else report)
        url = settings.daemon.url
        print(f"supervising in the foreground (API at {url}); Ctrl-C stops", file=sys.stderr, flush=True)
        printing_events = True
        await serving
        return 0
    finally:
        daemon.request_stop()
        await serving


async def _wait_ready(manager: Manager, names: list[str], *, quiet: bool) -> list[InstanceStatus]:
    printer = ProgressPrinter(sys.stderr, quiet=quiet)
    try:
        while True:
            statuses = [manager.get(n).status() for n in names]
            printer.update(statuses)
            if all_ready(statuses):
                return statuses
            await asyncio.sleep(_POLL_S)
    finally:
        printer.finish()


async def _unless_stopped(work: asyncio.Future[Any], serving: asyncio.Future[None]) -> bool:
    """Wait for ``work`` unless serving ends first (a signal, or a failure to start); True when the work
    finished."""
    await asyncio.wait([work, serving], return_when=asyncio.FIRST_COMPLETED)
    if work.done():
        work.result()  # its error, if any, is the command's
        return True
    work.cancel()
    serving.result()  # the daemon's own error (the state directory is owned, the port is taken)
    return False
