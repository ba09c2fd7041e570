"""`daemon.watch_config`: reload when the configuration file changes, as SIGHUP does.

The file's folder is watched (watchfiles, the watcher uvicorn's --reload uses: inotify on Linux), not the
file: an editor that saves by renaming a new file over the old one, or Kubernetes swapping the symlink of a
mounted ConfigMap, replaces the file a watch of it would hold. Changes are debounced: a reload follows
only once the folder has been quiet for `_QUIET_S`, so a file written in pieces is read whole; and only
when the file's content differs from the one last seen, so a save without a change, a touch, or another
file of the folder reloads nothing. A file read half-written all the same does not load (or names what is
missing) and changes nothing, as any reload of a bad file: the next save is read again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from launcher.config import Settings
from launcher.config_yaml import read_config_bytes
from launcher.errors import ConfigError, LauncherError
from launcher.reloading import Reloader

log = logging.getLogger("launcher")

# watchfiles yields a batch of changes once none came for `step` (the quiet time: also how often it looks at
# its stop event), or once it has grouped them for `debounce` (a file written without pause for longer is
# read all the same, and most likely does not load).
_QUIET_S = 0.5
_GROUPED_AT_MOST_S = 10.0


def _digest(path: Path) -> bytes | None:
    """What the file holds now (read as a reload reads it: bounded, a regular file only), or None."""
    try:
        return hashlib.sha256(read_config_bytes(path)).digest()
    except ConfigError:  # gone for the moment (replaced by a rename), or not a file a reload would read
        return None


async def watch(path: Path, reloader: Reloader, stop: asyncio.Event) -> None:
    """Reload through ``reloader`` each time the content of ``path`` changes, until ``stop`` is set."""
    from watchfiles import awatch  # imported by a daemon that watches: a few ms the others do not pay

    seen = await asyncio.to_thread(_digest, path)
    try:
        async for _changes in awatch(
            path.parent,
            debounce=int(_GROUPED_AT_MOST_S * 1000),
            step=int(_QUIET_S * 1000),
            stop_event=stop,
            recursive=False,
        ):
            now = await asyncio.to_thread(_digest, path)  # a read never holds the event loop
            if now is None or now == seen:
                continue
            seen = now
            log.info("%s changed: reloading the configuration", path)
            try:
                await reloader.reload()
            except LauncherError as exc:  # the reloader's event says so too
                log.error("%s: the configuration was not reloaded: %s", path, exc)
    except Exception:  # the folder went away, no inotify watch left: the daemon serves on, unwatched
        log.exception("%s is no longer watched: SIGHUP or `launcher reload` still reload it", path)


@dataclass(frozen=True)
class Watching:
    """The watcher of the configuration file, and how it is told to end."""

    task: asyncio.Task[None]
    stop_event: asyncio.Event

    async def stop(self) -> None:
        self.stop_event.set()  # the watcher sees it within a step, and its thread ends with it
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    def cancel(self) -> None:
        """End it now, a reload it began included (the daemon stops: nothing more is reloaded)."""
        self.stop_event.set()
        self.task.cancel()


def start_watching(settings: Settings, reloader: Reloader) -> Watching | None:
    """daemon.watch_config: reload as the file changes, until the daemon stops (`Watching.stop`)."""
    source = settings.source
    if not settings.daemon.watch_config or source is None:
        return None
    stop = asyncio.Event()
    task = asyncio.create_task(watch(source, reloader, stop), name="watch-config")
    log.info("watching %s: a change reloads it", source)
    return Watching(task, stop)
