"""The CLI's output while instances start: a line per state change (the server's latest log line shown in
place on a terminal), the verdict (ready, or why not) and where the ready ones serve. It takes
the wire types (launcher/schema*.py), as cli_output.py does."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import TextIO

from launcher.errors import LauncherError
from launcher.schema_instances import Download, InstanceStatus, State


def all_ready(statuses: Sequence[InstanceStatus]) -> bool:
    """True once every instance is ready; LauncherError when one failed or stopped on its way."""
    for status in statuses:
        if status.state in (State.FAILED, State.STOPPED):
            reason = status.last_error or status.last_exit or status.state
            # The server's last words, unless the reason already is them.
            said = status.log_tail[-1] if status.log_tail else status.log_line
            last = f"; last log line: {said}" if said and said not in reason else ""
            raise LauncherError(
                f"{status.name} did not become ready: {reason}{last}",
                hint=f"`launcher logs {status.name}` shows the server's output",
            )
    return all(status.state == State.READY for status in statuses)


def ready_report(statuses: Sequence[InstanceStatus], api_url: str, *, through_daemon: bool) -> str:
    """Where each instance serves, and the one address that serves them all: the daemon's front door."""
    lines = [f"{s.name} is ready at http://127.0.0.1:{s.port} (pid {s.pid})" for s in statuses]
    if through_daemon:
        lines.append(f"supervised by the daemon at {api_url}")
    lines.append(f"OpenAI-compatible API for every model: {api_url}/v1")
    body = json.dumps({"model": statuses[0].group, "messages": [{"role": "user", "content": "Hello"}]})
    lines.append(f"try: curl -s {api_url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'")
    return "\n".join(lines)


class ProgressPrinter:
    """One line per state change; on a terminal, the latest server log line is shown in place."""

    def __init__(self, out: TextIO, *, quiet: bool = False) -> None:
        self._out = out
        self._quiet = quiet
        self._tty = out.isatty()
        self._started = time.monotonic()
        self._seen: dict[str, str] = {}
        self._transient = False

    def _elapsed(self) -> str:
        return f"{time.monotonic() - self._started:6.1f}s"

    def update(self, statuses: Sequence[InstanceStatus]) -> None:
        if self._quiet:
            return
        for s in statuses:
            key = f"{s.state}|{s.restarts}"
            if self._seen.get(s.name) != key:
                self._seen[s.name] = key
                note = s.events[-1].message if s.events else ""
                note = "" if note == s.state else f" ({note})"
                self._clear()
                self._out.write(f"{self._elapsed()} {s.name}: {s.state}{note}\n")
        if self._tty and statuses:
            line = " | ".join(f"{s.name}: {_latest(s)[:100]}" for s in statuses)
            self._out.write(f"\r\x1b[K{self._elapsed()} {line}")
            self._transient = True
        self._out.flush()

    def _clear(self) -> None:
        if self._transient:
            self._out.write("\r\x1b[K")
            self._transient = False

    def finish(self) -> None:
        if not self._quiet:
            self._clear()
            self._out.flush()


def _latest(status: InstanceStatus) -> str:
    """What an instance is at: its download's progress while it downloads, else its server's last line."""
    if status.download is not None:
        return f"downloading {status.download.describe()}"
    return status.log_line or ""


class DownloadBar:
    """A download's progress: in place on a terminal, else a line at each tenth of the way."""

    def __init__(self, out: TextIO, *, quiet: bool = False) -> None:
        self._out = out
        self._quiet = quiet
        self._tty = out.isatty()
        self._tenth = -1
        self._shown = False

    def show(self, download: Download) -> None:
        if self._quiet:
            return
        tenth = 10 * download.done_bytes // download.total_bytes if download.total_bytes else 10
        if self._tty:
            self._out.write(f"\r\x1b[K{download.file}: {download.describe()}")
            self._shown = True
        elif tenth != self._tenth:
            self._out.write(f"{download.file}: {download.describe()}\n")
        self._tenth = tenth
        self._out.flush()

    def finish(self) -> None:
        if self._shown:
            self._out.write("\n")
            self._out.flush()
