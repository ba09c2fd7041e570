"""`launcher upgrade`: ask the daemon to upgrade in place (`POST /daemon/upgrade`), wait until its new program
answers, and say which servers it kept and which it started again.

Through the API rather than a signal to the pid in the state directory: it works wherever the API
reaches (`--url`, a container, another user holding the token), and a refusal (the daemon is starting or
stopping) comes back as an error and exit 1. Under systemd, `systemctl kill -s USR2 launcher` does the
same without a token (docs/service.md).
"""

from __future__ import annotations

import time

from launcher.client import DaemonClient
from launcher.errors import StartError

_POLL_S = 0.1


def upgrade(client: DaemonClient, timeout_s: float) -> str:
    """Upgrade the daemon behind ``client``; what became of each server, in one line."""
    before = {s.name: s.pid for s in client.instances() if s.pid is not None}
    started = client.upgrade()
    deadline = time.monotonic() + timeout_s
    while True:
        client.close()  # a kept-alive connection would end with the old program
        health = client.health()
        if health is not None and health.program_started_at not in (None, started.program_started_at):
            break
        if time.monotonic() > deadline:
            raise StartError(
                f"the daemon (pid {started.pid}) did not answer with its new program within {timeout_s:g}s",
                hint="its log says why (journalctl -u launcher)",
            )
        time.sleep(_POLL_S)
    after = {s.name: s.pid for s in client.instances()}
    kept = [name for name, pid in before.items() if after.get(name) == pid]
    again = [name for name in before if name not in kept]
    line = f"upgraded: the daemon (pid {started.pid}) runs the installed program"
    line += f"; servers kept: {', '.join(kept) or 'none'}"
    return line + (f"; started again: {', '.join(again)}" if again else "")
