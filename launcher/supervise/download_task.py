"""The download of an instance's files before its start, as the instance holds it: the task (the
manager's, supervise/downloads.py and ollama_downloads.py), how far it is, and how it ended.

While it runs the instance's state says downloading; a stop cancels it, and a download that fails leaves
the instance failed with its reason.
"""

from __future__ import annotations

import asyncio
import contextlib

from launcher.errors import LauncherError
from launcher.schema_instances import Download, State
from launcher.supervise.record import InstanceRecord


class DownloadTask:
    def __init__(self, record: InstanceRecord) -> None:
        self._record = record
        self._task: asyncio.Task[None] | None = None
        self.progress: Download | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def begin(self, task: asyncio.Task[None], what: str) -> None:
        """Hold ``task`` as the instance's download, in the state `downloading`."""
        self.progress = None
        self._record.keep_error(None)
        self._task = task
        self._record.set_state(State.DOWNLOADING, what)
        task.add_done_callback(self._ended)

    def advanced(self, progress: Download) -> None:
        """How far the download is; an event at each tenth of the way (the API has every reading)."""
        before = self.progress
        self.progress = progress
        if before is None or _tenth(before) != _tenth(progress):
            self._record.emit("download", progress.describe())
        else:
            self._record.changed_quietly()

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._record.state != State.DOWNLOADING:
            return
        exc = task.exception()
        if exc is not None:
            message = exc.message if isinstance(exc, LauncherError) else f"{type(exc).__name__}: {exc}"
            hint = exc.hint if isinstance(exc, LauncherError) else None
            self._record.record_error(message + (f" ({hint})" if hint else ""))
            self._record.set_state(State.FAILED)

    async def stop(self) -> None:
        """Cancel the download under way; its partial files stay for the next start to resume."""
        task = self._task
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([task])
        self._record.set_state(State.STOPPED, "download stopped; what was fetched is kept for the next start")


def _tenth(download: Download) -> int:
    return 10 * download.done_bytes // download.total_bytes if download.total_bytes else 10
